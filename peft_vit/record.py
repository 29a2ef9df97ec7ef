"""The per-run record: :class:`RunRecord`, the one definition of ``results.json`` (written
atomically, validated when read), the run's context, and atomic writes. The run logger and the
version info a record holds are the loop's (``engine/logger.py``)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import PeftVitError

RESULTS = "results.json"  # a run's record, in its output dir
WEIGHTS = "trainable.safetensors"  # its trained parameters (trainer.save_weights), beside the record
ACCURACY = {"final": "test_acc", "tune": "val_acc"}  # the accuracy a record of each protocol holds


@dataclass(frozen=True)
class RunContext:
    """Where a run writes and how it was launched; ``train.py`` takes it from Hydra."""
    output_dir: Path
    experiment: Optional[str] = None  # the experiment preset chosen, if any
    sweep: Optional[str] = None       # the multirun sweep's directory name, if any
    overrides: Tuple[str, ...] = ()   # the command-line overrides


class RecordError(PeftVitError, ValueError):
    """A results.json that cannot be read (``unreadable``) or is not a valid record; the message
    names the file and every problem."""

    def __init__(self, source: Any, problems: Sequence[str], unreadable: bool = False):
        self.source, self.problems, self.unreadable = source, list(problems), unreadable
        super().__init__(f"{source}: {'unreadable' if unreadable else 'malformed'} run record: "
                         + "; ".join(self.problems))


@dataclass
class RunRecord:
    """One run's result, as ``results.json`` holds it (``README.md``, "The run record").

    Written by the training loop (``peft_vit/engine/loop.py``), read by the report. The fields
    are the file's keys, in its order. A field typed ``Optional`` is always written (``null``
    when unknown); one whose default is None but whose type is not ``Optional`` is left out of
    the file when None (``test_acc`` / ``val_acc``: a record holds its protocol's, and older
    records lack the newer keys). ``diagnostics`` (the method's :meth:`Method.report`) is stored
    under the method's name; keys of other writers are kept in ``extra``."""
    method: str
    dataset: str
    task: str
    protocol: str  # tune | final
    seed: int
    train_split: str = None
    eval_split: str = None
    test_acc: float = None  # percent, last epoch (protocol final)
    val_acc: float = None   # percent, last epoch (protocol tune)
    accuracy_is: str = None
    best_acc_over_epochs: float = None
    best_epoch: int = None
    best_acc_selects_on: str = None
    epochs: int = None
    history: List[dict] = None
    trainable_params: float = None
    trainable_params_no_head: float = None
    total_params: float = None
    wall_time_s: float = None
    train_images_per_s: float = None
    startup_s: float = None
    eval_images_per_s: float = None
    peak_memory_mb: float = None
    peak_memory_kind: str = None
    world_size: int = None
    device: str = None
    compiled: bool = None
    compile_time_s: float = None
    experiment: Optional[str] = None
    sweep: Optional[str] = None
    overrides: List[str] = None
    git_commit: Optional[str] = None
    versions: Dict[str, str] = None
    config: dict = None
    config_fingerprint: str = None
    diagnostics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    REQUIRED = ("method", "dataset", "task", "protocol", "seed")

    @property
    def accuracy(self) -> Optional[float]:
        """The protocol's accuracy (``test_acc`` for final, ``val_acc`` for tune)."""
        return getattr(self, ACCURACY[self.protocol])

    # ---------------------------------------------------------------- dict / file

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in _FIELDS:
            v = getattr(self, f.name)
            if v is not None or f.name in _NULLABLE:
                out[f.name] = v
        if self.diagnostics:
            out[self.method] = self.diagnostics
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: Any, source: Any = "record") -> "RunRecord":
        """Validate ``d`` (:meth:`problems`) and build the record; a :class:`RecordError` naming
        ``source`` and every problem otherwise."""
        bad = cls.problems(d)
        if bad:
            raise RecordError(source, bad)
        known = {f.name for f in _FIELDS}
        diag = d.get(d["method"]) if isinstance(d.get(d["method"]), dict) else {}
        extra = {k: v for k, v in d.items() if k not in known and not (k == d["method"] and diag)}
        return cls(**{k: v for k, v in d.items() if k in known}, diagnostics=diag, extra=extra)

    @classmethod
    def read(cls, path: os.PathLike) -> "RunRecord":
        """The validated record at ``path``; a :class:`RecordError` naming the file otherwise."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise RecordError(path, [str(e)], unreadable=True) from e
        return cls.from_dict(data, source=path)

    def write(self, path: os.PathLike) -> None:
        """Atomically (:func:`atomic_file`): a reader sees the old record or the whole new one."""
        write_json_atomic(Path(path), self.to_dict())

    # ---------------------------------------------------------------- validation

    @classmethod
    def problems(cls, d: Any) -> List[str]:
        """What makes ``d`` not a valid record (empty when it is one): the required keys, each
        present key's type (from the field's annotation; ints count as floats, booleans as
        neither), finite numbers, non-empty names, and the protocol's accuracy."""
        if not isinstance(d, dict):
            return ["not a JSON object"]
        out = [f"missing {k!r}" for k in cls.REQUIRED if k not in d]
        for f in _FIELDS:
            if f.name not in d or f.name in ("diagnostics", "extra"):
                continue
            v, types = d[f.name], _TYPES[f.name]
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                out.append(f"{f.name!r} is {type(v).__name__}, expected {names}")
            elif isinstance(v, float) and not math.isfinite(v):
                out.append(f"{f.name!r} is {v}, expected a finite number")
        out += [f"{k!r} is empty" for k in ("method", "dataset", "task") if d.get(k) == ""]
        if isinstance(d.get("protocol"), str):
            if d["protocol"] not in ACCURACY:
                out.append(f"'protocol' is {d['protocol']!r}, expected tune or final")
            elif d.get(ACCURACY[d["protocol"]]) is None:
                out.append(f"missing {ACCURACY[d['protocol']]!r} (the accuracy of a {d['protocol']} record)")
        return out


def _accepted(tp) -> Tuple[type, ...]:
    """The JSON types a field's annotation accepts: float -> int or float, Optional[X] -> X or None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return tuple(t for a in args for t in _accepted(a))
    if tp is float:
        return (int, float)
    return (origin or tp,)


_FIELDS = [f for f in dataclasses.fields(RunRecord) if f.name not in ("diagnostics", "extra")]
_HINTS = typing.get_type_hints(RunRecord)
_TYPES = {f.name: _accepted(_HINTS[f.name]) for f in _FIELDS}
_NULLABLE = {f.name for f in _FIELDS if type(None) in _TYPES[f.name]}


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``. A reader
    sees the old file or the whole new one, never a partial one, and concurrent writers never
    interleave. On error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj: Dict[str, Any]) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
        f.write("\n")


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
