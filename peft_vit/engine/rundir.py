"""A run directory's state: who owns it (a lock), which configuration made what it holds (a
fingerprint), and leftovers of writers that were killed mid-write.

Fingerprint: a hash of the resolved config without the keys that do not change a run's
results (``IGNORED``: loader workers, progress and log output, the logger, where data and
outputs live, skip/resume/checkpoint/export switches, torch.compile). A checkpoint or a
results.json whose fingerprint differs is never used silently; the keys that differ are named.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# Keys (dotted) that never change what a run computes, only how or where it runs. torch.compile
# is here: it changes kernels, not the model or the recipe, and a run may need it turned off to
# resume somewhere else (its float rounding may differ; bit-identity holds for equal settings).
IGNORED = (
    "hydra", "paths", "logger", "skip_done", "output_dir",
    "trainer.num_workers", "trainer.progress", "trainer.log_every_s", "trainer.resume",
    "trainer.checkpoint_every", "trainer.save_weights", "trainer.compile",
    "dataset.root", "dataset.cache_dir", "dataset.tfds_dir", "dataset.prepare_if_missing",
    # a preset's lookup table (experiment=proxy's per-method learning rates): the run's own value
    # is resolved into its key (optim.lr), which stays
    "proxy_lr",
)


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED)


def result_config(cfg: Any) -> Dict[str, Any]:
    """The flattened resolved config (a DictConfig or a plain dict) without ``IGNORED`` keys."""
    import copy

    from omegaconf import DictConfig, OmegaConf, open_dict

    if isinstance(cfg, DictConfig):
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.pop("hydra", None)  # a launcher's job config has it; the run's has not
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in _flatten(cfg).items() if not _ignored(k)}


def fingerprint(flat: Dict[str, Any]) -> str:
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(old: Dict[str, Any], new: Dict[str, Any], limit: int = 8) -> List[str]:
    """``key: old -> new`` for each differing key (``<absent>`` where a side lacks it)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, KeyError) != new.get(k, KeyError))
    lines = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"... and {len(keys) - limit} more")
    return lines


class ForeignStateError(RuntimeError):
    """A checkpoint or record in the run dir was made by a different configuration."""


def check_same_config(what: str, path: Path, stored: Optional[Dict[str, Any]], current: Dict[str, Any],
                      choices: str) -> None:
    """Raise :class:`ForeignStateError` naming the differing keys unless ``stored`` (a flattened
    result config) equals ``current``."""
    if stored is None:
        raise ForeignStateError(f"{what} {path} records no configuration, so it cannot be told to match this "
                                f"run's; {choices}")
    if fingerprint(stored) == fingerprint(current):
        return
    diff = "\n  ".join(config_diff(stored, current))
    raise ForeignStateError(f"{what} {path} was made by a different configuration (stored -> now):\n  {diff}\n"
                            f"{choices}")


def record_config(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The result config of a results.json record (its resolved ``config``)."""
    cfg = record.get("config")
    return result_config(cfg) if isinstance(cfg, dict) else None


def finished_record(path: Path, current: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """skip_done: the results.json at ``path`` if it exists and was made by this configuration
    (``current``, a :func:`result_config`); None if there is none. A record of another
    configuration, or an unreadable one, is a :class:`ForeignStateError` naming the file (and
    the keys that differ): it is never returned in this run's place."""
    path = Path(path)
    if not path.is_file():
        return None
    choices = ("Use another output dir (hydra.run.dir / hydra.sweep.dir), delete the file to run here, or set "
               "skip_done=false to run and overwrite it.")
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ForeignStateError(f"results.json {path} is unreadable ({e}). {choices}") from e
    check_same_config("results.json", path, record_config(record), current, choices)
    return record


def skip_done(cfg: Any, run_dir: Path, current: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The one skip_done decision, made by the loop in the run and by the sweep launchers before
    submission (hydra_plugins/peft_vit_launcher.py): with ``cfg.skip_done``, the record in
    ``run_dir`` if it was made by this configuration (see :func:`finished_record`); None: run.
    ``current``: ``result_config(cfg)`` when the caller has it already."""
    from ..record import RESULTS

    if not cfg.get("skip_done", False):
        return None
    return finished_record(Path(run_dir) / RESULTS, result_config(cfg) if current is None else current)


def remove_stale_temp_files(run_dir: Path) -> List[Path]:
    """Delete the temp files of atomic writes (``.<name>.*.tmp``) that a killed writer left.
    Call only while holding the run dir's lock (no live writer then)."""
    gone = []
    for p in Path(run_dir).glob(".*.tmp"):
        try:
            p.unlink()
            gone.append(p)
        except OSError:
            pass
    return gone


class RunDirBusy(RuntimeError):
    """Another live process owns the run dir."""


class RunLock:
    """``<run dir>/.lock``, held with ``flock`` for the life of the run; it holds the owner's pid,
    host and start time, for the message a second launch gets. The kernel releases the lock
    when its process dies, however it dies, so a lock file left by a dead process (killed,
    crashed, node rebooted) is simply taken over."""

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.fd: Optional[int] = None
        self.previous: Optional[str] = None  # the owner a stale lock named, if any

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
                os.close(fd)
                raise RunDirBusy(f"run dir {self.path.parent} is in use by {owner} (lock {self.path}); wait for "
                                 f"that run to end, stop it, or choose another output dir") from None
            try:  # the owner may have released (and unlinked) it between our open and flock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.previous = os.pread(fd, 4096, 0).decode(errors="replace").strip() or None
        me = f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode() + b"\n", 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # still ours: nobody else can hold it now
            finally:
                os.close(self.fd)  # releases the flock
                self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
