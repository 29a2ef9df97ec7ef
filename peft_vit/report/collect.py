"""Read many ``results.json`` run records (:class:`peft_vit.record.RunRecord` defines and
validates them; a malformed one is skipped and named in :attr:`Collection.issues`), group them
into table rows, and select hyper-parameters.

* A *view* is one way of reading an accuracy out of a record, and a row holds one view, so
  protocols never mix: ``final/last-epoch`` (final, ``test_acc``), ``final/max-over-epochs
  (selects on test)`` (final, ``best_acc_over_epochs``), ``tune/val`` (tune, ``val_acc``).
* Rows are (dataset, method, backbone, experiment, view). Two records of a row with the same
  task and seed are a *duplicate* when their configs agree after dropping
  :data:`IGNORED_CONFIG_KEYS` (the last in path order is kept: Hydra's timestamped run
  directories sort oldest first; each is reported), and otherwise a *conflict*: the differing
  keys become part of the row (a *variant*, ``optim.lr=0.001``), never averaged together.
* Selection reads tune runs on val200 only; anything that could select on test is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import namedtuple
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd

from ..record import RESULTS, RecordError, RunRecord

DEFAULT_BACKBONE = "vit_base_patch16_224.orig_in21k"
BACKBONE_MARKS = {DEFAULT_BACKBONE: "", "vit_base_patch16_224.augreg_in21k": "*"}  # the papers' * rows
# the order of methods in tables and benchmarks: the baselines, then by publication year, as the
# papers' tables list them
METHOD_ORDER = ["linear", "full", "bitfit", "vpt_deep", "adapter", "adaptformer", "lora", "dora",
                "vera", "fact_tk", "ssf", "kadaptation", "rlrr", "householder"]


View = namedtuple("View", "key label protocol field")  # field: the record's accuracy
VIEWS: Dict[str, View] = {
    "last": View("last", "final/last-epoch", "final", "test_acc"),
    "max": View("max", "final/max-over-epochs (selects on test)", "final", "best_acc_over_epochs"),
    "val": View("val", "tune/val", "tune", "val_acc"),
}
VIEW_ORDER = list(VIEWS)

# config keys that do not change a run's result (or are in the row key already)
IGNORED_CONFIG_KEYS = (
    "seed", "protocol", "paths", "hydra", "logger", "skip_done", "output_dir",
    "trainer.num_workers", "trainer.progress", "trainer.device", "trainer.checkpoint_every",
    "trainer.eval_batch_size", "trainer.save_weights", "dataset.root", "model.checkpoint",
)

# --------------------------------------------------------------------------- records

NUMBER = (int, float)


def settings_of(configs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each config flattened ({'optim': {'lr': 1}} -> {'optim.lr': 1}; lists stay values), without
    the keys that do not change the result, and with None taken as absent. The keys come from
    one ``json_normalize`` over all configs; the values are read from each config as written
    (a frame would turn the ints of a column with gaps into floats)."""
    keys = [k for k in pd.json_normalize(list(configs), sep=".").columns if not _ignored(k)]
    return [{k: v for k in keys if (v := _get(c, k)) is not None} for c in configs]


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_CONFIG_KEYS)


def _get(d: Any, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


@dataclass
class Record:
    """One validated results.json as the report groups it. ``path`` is relative to the directory
    given (for messages)."""
    path: str
    run: RunRecord
    file: Optional[Path] = None
    settings: Dict[str, Any] = field(default_factory=dict)  # the config as settings_of gives it

    def __getattr__(self, name: str):
        if name in ("method", "dataset", "task", "protocol", "seed", "experiment"):
            return getattr(self.run, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    config = property(lambda self: self.run.config or {})
    backbone = property(lambda self: str(_get(self.config, "model.name") or DEFAULT_BACKBONE))

    @cached_property
    def data(self) -> Dict[str, Any]:
        """The record as its file holds it."""
        return self.run.to_dict()

    def value(self, view: View) -> Optional[float]:
        v = getattr(self.run, view.field)
        if self.protocol != view.protocol or v is None:
            return None
        if view.field == "best_acc_over_epochs" and (self.run.best_acc_selects_on or "test") != "test":
            return None  # a final record whose max selects on something else: not this view
        return float(v)

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Collection:
    records: List[Record]
    issues: List[str] = field(default_factory=list)   # unreadable or malformed files, skipped


def load_records(paths: Sequence[os.PathLike]) -> Collection:
    """Every valid results.json under ``paths`` (directories, searched recursively, or files), sorted
    by path. An unreadable or malformed file is skipped and named in ``issues``."""
    recs, issues, seen, found = [], [], set(), []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
        found += [(p.parent, p)] if p.is_file() else [(p, f) for f in sorted(p.rglob(RESULTS))]
    for root, f in found:
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        rel = f.relative_to(root).as_posix()
        if len(paths) > 1:  # prefix the directory as it was given
            rel = f"{root.as_posix().rstrip('/')}/{rel}"
        try:
            recs.append(Record(rel, RunRecord.read(f), f))
        except RecordError as e:
            issues.append(f"{'unreadable' if e.unreadable else 'malformed'} {rel}: {'; '.join(e.problems)}")
    for r, s in zip(recs, settings_of([r.config for r in recs])):
        r.settings = s
    return Collection(sorted(recs, key=lambda r: r.path), issues)


# --------------------------------------------------------------------------- grouping

def method_label(method: str, backbone: str) -> str:
    mark = BACKBONE_MARKS.get(backbone)
    return method + (mark if mark is not None else f" [{backbone}]")


def method_rank(method: str) -> Tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else str(v)


def varying(records: Sequence[Record]) -> List[str]:
    """The settings whose values differ among ``records`` (a missing key counts as None)."""
    keys = set().union(*(r.settings for r in records))
    return sorted(k for k in keys if len({_fmt_value(r.settings.get(k)) for r in records}) > 1)


ROW_KEY = ["dataset", "method", "backbone", "experiment", "view"]
LONG = ROW_KEY + ["protocol", "task", "seed", "fp", "path", "record", "value", "params", "params_no_head"]


def group_rows(records: Iterable[Record], views: Sequence[str] = VIEW_ORDER,
               notes: Optional[List[str]] = None) -> pd.DataFrame:
    """Records -> the measurements of the table rows (see the module docstring), one per row, task
    and seed (:data:`LONG`), numbered in table order (``row``), each row with its ``variant`` and
    ``label``. Duplicates and variant splits are appended to ``notes``."""
    notes = notes if notes is not None else []
    num = lambda x: math.nan if x is None else float(x)  # noqa: E731
    df = pd.DataFrame([(r.dataset, r.method, r.backbone, r.experiment or "", v, VIEWS[v].protocol, r.task, str(r.seed),
                        r.fingerprint, r.path, r, r.value(VIEWS[v]), num(r.run.trainable_params),
                        num(r.run.trainable_params_no_head))
                       for r in records for v in views if r.value(VIEWS[v]) is not None], columns=LONG)
    same, reported, parts = ROW_KEY + ["task", "seed", "fp"], set(), []
    df["dup"], df["kept"] = df.duplicated(same, keep=False), ~df.duplicated(same, keep="last")
    for (ds, method, backbone, exp, vk), g in df.groupby(ROW_KEY, sort=False):
        view = VIEWS[vk]
        for (task, seed, fp), d in g[g.dup].groupby(["task", "seed", "fp"], sort=False):
            if (key := (ds, method, backbone, exp, view.protocol, task, seed, fp)) not in reported:
                reported.add(key)
                notes.append(f"duplicate: {ds} {method} task={task} seed={seed} protocol={view.protocol} has "
                             f"{len(d)} records with the same config; kept {d.path.iloc[-1]}, ignored "
                             + ", ".join(d.path.iloc[:-1]))
        g = g[g.kept]
        clashes = g[g.duplicated(["task", "seed"], keep=False)].groupby(["task", "seed"]).record
        vkeys = sorted(set().union(*(varying(list(c)) for _, c in clashes)))
        if vkeys:
            notes.append(f"split: {ds} {method} {f'experiment={exp}' if exp else '(no experiment)'} {view.label}: "
                         f"records of the same task and seed differ in {', '.join(vkeys)}; one row per setting")
        parts.append(g.assign(variant=[tuple((k, _fmt_value(r.settings.get(k))) for k in vkeys) for r in g.record]))
    if not parts:
        return df.assign(variant="", label="", row=0)
    long = pd.concat(parts)
    sort_key = [(ds, method_rank(m), bb != DEFAULT_BACKBONE, bb, exp != "", exp, var, VIEW_ORDER.index(v))
                for ds, m, bb, exp, v, var in zip(*(long[k] for k in ROW_KEY), long.variant)]
    rank = {k: i for i, k in enumerate(sorted(set(sort_key)))}
    long["row"] = [rank[k] for k in sort_key]
    long["label"] = [method_label(m, bb) + (" (" + ", ".join(f"{k}={v}" for k, v in var) + ")" if var else "")
                     for m, bb, var in zip(long.method, long.backbone, long.variant)]
    long["variant"] = [", ".join(f"{k}={v}" for k, v in var) for var in long.variant]
    return long.sort_values("row", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- selection

class SelectionError(ValueError):
    pass


@dataclass
class Candidate:
    values: Tuple[Tuple[str, Any], ...]       # the varying hyper-parameters
    scores: List[float]
    seeds: List[Any]
    records: List[Record]

    mean = property(lambda self: float(pd.Series(self.scores).mean()))
    std = property(lambda self: None if len(self.scores) < 2 else float(pd.Series(self.scores).std()))  # ddof=1


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
        return self.base_overrides + hp + ["protocol=final", "seed=" + ",".join(str(s) for s in seeds)]


def _override_value(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    s = str(v)
    return s if s and all(c.isalnum() or c in "._-/" for c in s) else json.dumps(s)


_DROP_OVERRIDES = ("protocol", "seed", "hydra", "skip_done")  # never re-emitted from the tuned runs


def _record_overrides(r: Record) -> Optional[List[str]]:
    """The command-line overrides the run was launched with: from the record when it stores
    them, else from Hydra's ``.hydra/overrides.yaml`` beside it."""
    srcs = [r.data.get("overrides"), _get(r.data, "hydra.overrides.task"), _get(r.config, "hydra.overrides.task")]
    f = Path(r.file).parent / ".hydra" / "overrides.yaml" if r.file is not None else None
    if f is not None and f.is_file():
        import yaml

        try:
            srcs.append(yaml.safe_load(f.read_text()))
        except (OSError, yaml.YAMLError):
            pass
    return next((list(s) for s in srcs if isinstance(s, list) and all(isinstance(x, str) for x in s)), None)


def rank_candidates(cands: List[Candidate]) -> List[Candidate]:
    """Best first. Documented tie rule: higher mean metric; then smaller ``optim.lr``; then
    larger ``optim.weight_decay``; then the remaining varying values compared as strings."""
    def num(c, k, sign):
        v = dict(c.values).get(k)
        return sign * float(v) if isinstance(v, NUMBER) else math.inf

    def rest(c):
        return tuple(_fmt_value(v) for k, v in c.values if k not in ("optim.lr", "optim.weight_decay"))

    return sorted(cands, key=lambda c: (-round(c.mean, 9), num(c, "optim.lr", 1), num(c, "optim.weight_decay", -1),
                                        rest(c)))


SELECTION_KEY = ["dataset", "method", "task", "experiment", "backbone"]


def select_best(records: Sequence[Record], metric: str = "val_acc", ignore_final: bool = False,
                notes: Optional[List[str]] = None) -> List[Selection]:
    """Per (dataset, method, task, experiment, backbone): the hyper-parameters (every config key
    that varies among the tuned runs, typically ``optim.lr`` and ``optim.weight_decay``) with
    the best ``metric`` averaged over seeds (a second run of a candidate and seed: the first kept).

    Refuses anything that could select on test: ``final`` records (unless ``ignore_final``,
    which skips them), records evaluated on the test split, and a metric that selects on test."""
    notes = notes if notes is not None else []
    if metric not in ("val_acc", "best_acc_over_epochs"):
        raise SelectionError(f"--metric {metric}: use val_acc (last epoch on val200) or best_acc_over_epochs "
                             "(max over epochs on val200)")

    def on_test(r):
        return (r.protocol != "tune" or r.data.get("eval_split") == "test" or "test_acc" in r.data
                or (metric == "best_acc_over_epochs" and "test" in str(r.data.get("best_acc_selects_on", "test"))))

    bad = [r for r in records if on_test(r)]
    if bad:
        msg = (f"{len(bad)} record(s) are not tune-protocol validation runs (selecting on them would select "
               f"on test): " + ", ".join(r.path for r in bad[:5]) + (" ..." if len(bad) > 5 else ""))
        if not ignore_final:
            raise SelectionError(msg + "\npoint select_best at tune sweeps only, or pass --ignore-final to skip them")
        notes.append("skipped: " + msg)
    notes += [f"skipped {r.path}: no {metric}" for r in records
              if not on_test(r) and not isinstance(r.data.get(metric), NUMBER)]
    df = pd.DataFrame([(r.dataset, r.method, r.task, r.experiment or "", r.backbone, r, str(r.seed))
                       for r in records if not on_test(r) and isinstance(r.data.get(metric), NUMBER)],
                      columns=SELECTION_KEY + ["record", "seed"])
    out = []
    for (ds, method, task, exp, backbone), g in sorted(df.groupby(SELECTION_KEY), key=lambda kv: (
            kv[0][0], method_rank(kv[0][1]), *kv[0][2:])):
        # lr and wd first, then the rest alphabetically
        keys = sorted(varying(list(g.record)), key=lambda k: ({"optim.lr": 0, "optim.weight_decay": 1}.get(k, 2), k))
        g = g.assign(cand=[tuple(_fmt_value(r.settings.get(k)) for k in keys) for r in g.record])
        first = g.drop_duplicates(["cand", "seed"]).set_index(["cand", "seed"]).record
        for c, r in zip(g.cand, g.record):
            if first[(c, str(r.seed))] is not r:
                notes.append(f"duplicate: {ds} {method} {task} seed={r.seed} "
                             f"{dict(zip(keys, map(r.settings.get, keys)))}"
                             f": kept the first ({first[(c, str(r.seed))].path}), ignored {r.path}")
        ranked = rank_candidates([Candidate(tuple((k, rs.iloc[0].settings.get(k)) for k in keys),
                                            [float(r.data[metric]) for r in rs], [r.seed for r in rs], list(rs))
                                  for _, rs in first.groupby(level="cand", sort=False)])
        if len(nseeds := {len(c.seeds) for c in ranked}) > 1:
            notes.append(f"uneven: {ds} {method} {task}: candidates have {sorted(nseeds)} seeds")
        ov = _record_overrides(ranked[0].records[0])
        base = ov if ov is not None else ([f"experiment={exp}"] if exp else []) + [f"method={method}",
                                                                                    f"dataset={ds}/{task}"]
        base = [o for o in base if not any((k := o.lstrip("+~").split("=", 1)[0]) == d or k.startswith(d + ".")
                                           for d in _DROP_OVERRIDES) and k not in keys]
        out.append(Selection(method, ds, task, exp or None, backbone, metric, keys, ranked[0], ranked, base,
                             ov is not None))
    return out
