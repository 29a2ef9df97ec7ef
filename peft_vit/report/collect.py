"""Read many ``results.json`` run records, group them, and select hyper-parameters.

The record is the contract written by the training loop (``peft_vit/engine/loop.py``): one
file per run, with ``method``, ``dataset``, ``task``, ``protocol`` (``tune`` | ``final``),
``seed``, the accuracy (``val_acc`` for tune, ``test_acc`` for final, both of the LAST
epoch), ``best_acc_over_epochs`` with ``best_acc_selects_on`` naming the split that maximum
selects on, the parameter counts and the full resolved ``config``.

Views
-----
A *view* is one way of reading an accuracy out of a record. A table row always holds a
single view, so protocols never mix within a row:

==========================================  ========  =========================
label                                       protocol  field
==========================================  ========  =========================
``final/last-epoch``                        final     ``test_acc``
``final/max-over-epochs (selects on test)`` final     ``best_acc_over_epochs``
``tune/val``                                tune      ``val_acc``
==========================================  ========  =========================

Row keys, duplicates and variants
---------------------------------
Records are grouped into rows by (dataset, method, backbone, experiment, view). Within a
row, two records of the same task and seed are

* a *duplicate* when their configs agree (after dropping keys that do not change the
  result: seed, paths, logging, workers, ...). Only one is kept (the last in sorted path
  order: Hydra's timestamped run directories sort oldest first) and every duplicate is
  reported;
* a *conflict* otherwise (e.g. a learning-rate sweep). The config keys that differ are then
  added to the row key as a *variant* (``optim.lr=0.001``), so different settings are never
  averaged together, and the split is reported.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

RESULTS = "results.json"
DEFAULT_BACKBONE = "vit_base_patch16_224.orig_in21k"
# the rows the papers mark *
BACKBONE_MARKS = {DEFAULT_BACKBONE: "", "vit_base_patch16_224.augreg_in21k": "*"}


@dataclass(frozen=True)
class View:
    key: str
    label: str
    protocol: str
    field: str


VIEWS: Dict[str, View] = {
    "last": View("last", "final/last-epoch", "final", "test_acc"),
    "max": View("max", "final/max-over-epochs (selects on test)", "final", "best_acc_over_epochs"),
    "val": View("val", "tune/val", "tune", "val_acc"),
}
VIEW_ORDER = ["last", "max", "val"]

# config keys that do not change a run's result (or are in the row key already)
IGNORED_CONFIG_KEYS = (
    "seed", "protocol", "paths", "hydra", "logger", "skip_done", "output_dir",
    "trainer.num_workers", "trainer.progress", "trainer.device", "trainer.checkpoint_every",
    "trainer.eval_batch_size", "trainer.save_weights", "dataset.root", "model.checkpoint",
)


# --------------------------------------------------------------------------- records

@dataclass
class Record:
    path: str                 # relative to the collection root (for messages)
    data: Dict[str, Any]
    file: Optional[Path] = None  # the results.json itself

    @property
    def method(self) -> str:
        return str(self.data.get("method") or _get(self.config, "method.name") or "?")

    @property
    def dataset(self) -> str:
        return str(self.data.get("dataset") or _get(self.config, "dataset.name") or "?")

    @property
    def task(self) -> str:
        return str(self.data.get("task") or _get(self.config, "dataset.task") or "?")

    @property
    def protocol(self) -> str:
        return str(self.data.get("protocol") or _get(self.config, "protocol") or "?")

    @property
    def seed(self) -> Any:
        s = self.data.get("seed", _get(self.config, "seed"))
        return s

    @property
    def experiment(self) -> Optional[str]:
        return self.data.get("experiment")

    @property
    def backbone(self) -> str:
        return str(_get(self.config, "model.name") or DEFAULT_BACKBONE)

    @property
    def config(self) -> Dict[str, Any]:
        return self.data.get("config") or {}

    def value(self, view: View) -> Optional[float]:
        if self.protocol != view.protocol:
            return None
        v = self.data.get(view.field)
        if view.field == "best_acc_over_epochs" and self.data.get("best_acc_selects_on", "test") != "test":
            return None  # a final record whose max selects on something else: not this view
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def fingerprint(self) -> str:
        flat = {k: v for k, v in flatten(self.config).items() if not _ignored(k)}
        return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _get(d: Any, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_CONFIG_KEYS)


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; lists stay values."""
    out: Dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


@dataclass
class Collection:
    records: List[Record]
    issues: List[str] = field(default_factory=list)   # unreadable files etc.


def find_results(paths: Sequence[os.PathLike]) -> List[Tuple[Path, Path]]:
    """(root, file) for every results.json under the given dirs (or given directly), sorted."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            out.append((p.parent, p))
        elif p.is_dir():
            out.extend((p, f) for f in sorted(p.rglob(RESULTS)))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def load_records(paths: Sequence[os.PathLike]) -> Collection:
    """Every results.json under ``paths`` (recursively). Paths in messages are relative to the
    directory given on the command line."""
    recs, issues = [], []
    seen = set()
    multi = len(paths) > 1
    for root, f in find_results(paths):
        real = f.resolve()
        if real in seen:
            continue
        seen.add(real)
        rel = f.relative_to(root).as_posix()
        if multi:  # prefix the directory as it was given
            rel = f"{root.as_posix().rstrip('/')}/{rel}"
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            issues.append(f"unreadable {rel}: {e}")
            continue
        if not isinstance(data, dict):
            issues.append(f"unreadable {rel}: not a JSON object")
            continue
        recs.append(Record(rel, data, f))
    recs.sort(key=lambda r: r.path)
    return Collection(recs, issues)


# --------------------------------------------------------------------------- grouping

@dataclass
class Entry:
    """One (task, seed) measurement of a row: the kept record's value."""
    task: str
    seed: Any
    value: float
    record: Record


@dataclass
class RowData:
    dataset: str
    method: str
    backbone: str
    experiment: Optional[str]
    view: View
    variant: Tuple[Tuple[str, str], ...] = ()
    entries: List[Entry] = field(default_factory=list)

    @property
    def key(self):
        return (self.dataset, self.method, self.backbone, self.experiment, self.view.key, self.variant)

    @property
    def method_label(self) -> str:
        mark = BACKBONE_MARKS.get(self.backbone)
        label = self.method + (mark if mark is not None else f" [{self.backbone}]")
        if self.variant:
            label += " (" + ", ".join(f"{k}={v}" for k, v in self.variant) + ")"
        return label


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def group_rows(records: Iterable[Record], views: Sequence[str] = ("last", "max", "val"),
               notes: Optional[List[str]] = None) -> List[RowData]:
    """Records -> rows (see the module docstring). Duplicates and variant splits are appended
    to ``notes``."""
    notes = notes if notes is not None else []
    # 1. base groups: (dataset, method, backbone, experiment, view) -> records with a value
    base: Dict[tuple, List[Record]] = {}
    for r in records:
        for vk in views:
            view = VIEWS[vk]
            if r.value(view) is None:
                continue
            base.setdefault((r.dataset, r.method, r.backbone, r.experiment, vk), []).append(r)

    rows: Dict[tuple, RowData] = {}
    reported_dups = set()
    for (ds, method, backbone, exp, vk), recs in base.items():
        view = VIEWS[vk]
        # 2. duplicates: same task, seed and config fingerprint -> keep the last path
        by_fp: Dict[tuple, List[Record]] = {}
        for r in recs:
            by_fp.setdefault((r.task, str(r.seed), r.fingerprint()), []).append(r)
        kept = []
        for k, rs in by_fp.items():
            rs = sorted(rs, key=lambda r: r.path)
            kept.append(rs[-1])
            if len(rs) > 1:
                dkey = (ds, method, backbone, exp, view.protocol, k)
                if dkey not in reported_dups:
                    reported_dups.add(dkey)
                    notes.append(f"duplicate: {ds} {method} task={k[0]} seed={k[1]} protocol={view.protocol}"
                                 f" has {len(rs)} records with the same config; kept {rs[-1].path}, ignored "
                                 + ", ".join(r.path for r in rs[:-1]))
        # 3. conflicts: same task and seed, different configs -> variant keys
        by_ts: Dict[tuple, List[Record]] = {}
        for r in kept:
            by_ts.setdefault((r.task, str(r.seed)), []).append(r)
        variant_keys = set()
        for rs in by_ts.values():
            if len(rs) > 1:
                flats = [{k: v for k, v in flatten(r.config).items() if not _ignored(k)} for r in rs]
                keys = set().union(*flats)
                variant_keys |= {k for k in keys if len({_fmt_value(f.get(k)) for f in flats}) > 1}
        vkeys = sorted(variant_keys)
        if vkeys:
            notes.append(f"split: {ds} {method} {_exp_label(exp)} {view.label}: records of the same task and seed "
                         f"differ in {', '.join(vkeys)}; one row per setting")
        for r in sorted(kept, key=lambda r: r.path):
            variant = tuple((k, _fmt_value(_get(r.config, k))) for k in vkeys)
            row = rows.get((ds, method, backbone, exp, vk, variant))
            if row is None:
                row = rows[(ds, method, backbone, exp, vk, variant)] = RowData(ds, method, backbone, exp, view, variant)
            row.entries.append(Entry(r.task, r.seed, r.value(view), r))
    return sorted(rows.values(), key=row_sort_key)


METHOD_ORDER = ["linear", "full", "adapter", "lora", "kadaptation", "rlrr", "householder"]


def method_rank(method: str) -> Tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def row_sort_key(row: RowData):
    return (row.dataset, method_rank(row.method), row.backbone != DEFAULT_BACKBONE, row.backbone,
            row.experiment is not None, row.experiment or "", row.variant, VIEW_ORDER.index(row.view.key))


def _exp_label(exp: Optional[str]) -> str:
    return f"experiment={exp}" if exp else "(no experiment)"


# --------------------------------------------------------------------------- selection

class SelectionError(ValueError):
    pass


@dataclass
class Candidate:
    values: Tuple[Tuple[str, Any], ...]       # the varying hyper-parameters
    scores: List[float]
    seeds: List[Any]
    records: List[Record]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def std(self) -> Optional[float]:
        return _std(self.scores)

    def get(self, key: str, default=None):
        return dict(self.values).get(key, default)


@dataclass
class Selection:
    method: str
    dataset: str
    task: str
    experiment: Optional[str]
    backbone: str
    metric: str
    keys: List[str]                   # the hyper-parameters that varied
    best: Candidate
    candidates: List[Candidate]       # ranked, best first
    base_overrides: List[str]         # overrides to reproduce the tuned runs (without the swept keys)
    overrides_exact: bool             # True when taken from the records, False when reconstructed

    def final_overrides(self, seeds: Sequence[int]) -> List[str]:
        hp = [f"{k}={_override_value(v)}" for k, v in self.best.values]
        seed = "seed=" + ",".join(str(s) for s in seeds)
        return self.base_overrides + hp + ["protocol=final", seed]


def _override_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    s = str(v)
    return s if s and all(c.isalnum() or c in "._-/" for c in s) else json.dumps(s)


# keys a selection never re-emits from the tuned runs' own overrides
_DROP_OVERRIDES = ("protocol", "seed", "hydra", "skip_done")


def _record_overrides(r: Record) -> Optional[List[str]]:
    """The command-line overrides the run was launched with: from the record when it stores
    them, else from Hydra's ``.hydra/overrides.yaml`` beside it."""
    for src in (r.data.get("overrides"), _get(r.data, "hydra.overrides.task"),
                _get(r.config, "hydra.overrides.task")):
        if isinstance(src, list) and all(isinstance(x, str) for x in src):
            return list(src)
    if r.file is not None:
        f = Path(r.file).parent / ".hydra" / "overrides.yaml"
        if f.is_file():
            import yaml

            try:
                src = yaml.safe_load(f.read_text())
            except (OSError, yaml.YAMLError):
                return None
            if isinstance(src, list) and all(isinstance(x, str) for x in src):
                return list(src)
    return None


def _override_key(o: str) -> str:
    return o.lstrip("+~").split("=", 1)[0]


def rank_candidates(cands: List[Candidate]) -> List[Candidate]:
    """Best first. Documented tie rule: higher mean metric; then smaller ``optim.lr``; then
    larger ``optim.weight_decay``; then the remaining varying values compared as strings."""
    def lr(c):
        v = c.get("optim.lr")
        return float(v) if isinstance(v, (int, float)) else math.inf

    def wd(c):
        v = c.get("optim.weight_decay")
        return -float(v) if isinstance(v, (int, float)) else math.inf

    def rest(c):
        return tuple(_fmt_value(v) for k, v in c.values if k not in ("optim.lr", "optim.weight_decay"))

    return sorted(cands, key=lambda c: (-round(c.mean, 9), lr(c), wd(c), rest(c)))


def select_best(records: Sequence[Record], metric: str = "val_acc", ignore_final: bool = False,
                notes: Optional[List[str]] = None) -> List[Selection]:
    """Per (dataset, method, task, experiment, backbone): the hyper-parameters (every config key
    that varies among the tuned runs, typically ``optim.lr`` and ``optim.weight_decay``) with
    the best ``metric`` averaged over seeds.

    Refuses anything that could select on test: ``final`` records (unless ``ignore_final``,
    which skips them), records evaluated on the test split, and a metric that selects on test."""
    notes = notes if notes is not None else []
    if metric not in ("val_acc", "best_acc_over_epochs"):
        raise SelectionError(f"--metric {metric}: use val_acc (last epoch on val200) or best_acc_over_epochs "
                             "(max over epochs on val200)")
    bad, tune = [], []
    for r in records:
        on_test = r.protocol != "tune" or r.data.get("eval_split") == "test" or "test_acc" in r.data
        if metric == "best_acc_over_epochs" and "test" in str(r.data.get("best_acc_selects_on", "test")):
            on_test = True
        (bad if on_test else tune).append(r)
    if bad:
        msg = (f"{len(bad)} record(s) are not tune-protocol validation runs (selecting on them would select "
               f"on test): " + ", ".join(r.path for r in bad[:5]) + (" ..." if len(bad) > 5 else ""))
        if not ignore_final:
            raise SelectionError(msg + "\npoint select_best at tune sweeps only, or pass --ignore-final to skip them")
        notes.append("skipped: " + msg)

    groups: Dict[tuple, List[Record]] = {}
    for r in tune:
        if not isinstance(r.data.get(metric), (int, float)):
            notes.append(f"skipped {r.path}: no {metric}")
            continue
        groups.setdefault((r.dataset, r.method, r.task, r.experiment or "", r.backbone), []).append(r)

    out = []
    for (ds, method, task, exp, backbone), recs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], method_rank(kv[0][1]), kv[0][2], kv[0][3], kv[0][4])):
        flats = [{k: v for k, v in flatten(r.config).items() if not _ignored(k)} for r in recs]
        allk = set().union(*flats) if flats else set()
        keys = sorted(k for k in allk if len({_fmt_value(f.get(k)) for f in flats}) > 1)
        # lr and wd first, then the rest alphabetically
        keys.sort(key=lambda k: ({"optim.lr": 0, "optim.weight_decay": 1}.get(k, 2), k))
        cands: Dict[tuple, Candidate] = {}
        for r, f in zip(recs, flats):
            values = tuple((k, f.get(k)) for k in keys)
            ck = tuple(_fmt_value(v) for _, v in values)
            c = cands.setdefault(ck, Candidate(values, [], [], []))
            if any(str(s) == str(r.seed) for s in c.seeds):
                notes.append(f"duplicate: {ds} {method} {task} seed={r.seed} {dict(values)}: kept the first "
                             f"({c.records[[str(s) for s in c.seeds].index(str(r.seed))].path}), ignored {r.path}")
                continue
            c.scores.append(float(r.data[metric]))
            c.seeds.append(r.seed)
            c.records.append(r)
        ranked = rank_candidates(list(cands.values()))
        best = ranked[0]
        nseeds = {len(c.seeds) for c in ranked}
        if len(nseeds) > 1:
            notes.append(f"uneven: {ds} {method} {task}: candidates have {sorted(nseeds)} seeds")
        ov = _record_overrides(best.records[0])
        exact = ov is not None
        if ov is None:
            ov = ([f"experiment={exp}"] if exp else []) + [f"method={method}", f"dataset={ds}/{task}"]
        swept = set(keys)
        base = [o for o in ov if _override_key(o) not in swept
                and not any(_override_key(o) == k or _override_key(o).startswith(k + ".") for k in _DROP_OVERRIDES)]
        out.append(Selection(method, ds, task, exp or None, backbone, metric, keys, best, ranked, base, exact))
    return out


# --------------------------------------------------------------------------- stats

def _std(xs: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (ddof=1); None for fewer than two values."""
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def mean_std(xs: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    if not xs:
        return None, None
    return sum(xs) / len(xs), _std(xs)
