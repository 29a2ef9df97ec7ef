"""Read many ``results.json`` run records, group them into table rows, and select hyper-parameters.

* A *view* reads one accuracy out of a record, and a row holds one view, so protocols never mix:
  ``final/last-epoch`` (``test_acc``), ``final/max-over-epochs (selects on test)``
  (``best_acc_over_epochs``), ``tune/val`` (``val_acc``).
* Rows are (dataset, method, backbone, experiment, view). Two records of a row with the same task
  and seed are a *duplicate* when their :attr:`Record.settings` agree (the last in path order is
  kept: Hydra's timestamped run directories sort oldest first; each is reported), and otherwise a
  *conflict*: the differing settings become part of the row (a *variant*, ``optim.lr=0.001``),
  never averaged together.
* Selection reads tune runs on val200 only; anything that could select on test is refused.
"""
from __future__ import annotations

import json
import os
from collections import namedtuple
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd

from ..errors import PeftVitError
from ..fingerprint import fingerprint, result_config
from ..record import RESULTS, RecordError, RunRecord

DEFAULT_BACKBONE = "vit_base_patch16_224.orig_in21k"
BACKBONE_MARKS = {DEFAULT_BACKBONE: "", "vit_base_patch16_224.augreg_in21k": "*"}  # the papers' * rows
# the order of methods in tables and benchmarks: the baselines, then by publication year, as the
# papers' tables list them
METHOD_ORDER = ["linear", "full", "ln_tune", "bitfit", "difffit", "vpt_deep", "adapter", "adaptformer", "convpass",
                "repadapter", "lora", "dora", "vera", "fact_tk", "fact_tt", "ssf", "kadaptation", "oft", "boft", "hra",
                "rlrr", "householder"]

View = namedtuple("View", "key label protocol field")  # field: the record's accuracy
VIEWS: Dict[str, View] = {
    "last": View("last", "final/last-epoch", "final", "test_acc"),
    "max": View("max", "final/max-over-epochs (selects on test)", "final", "best_acc_over_epochs"),
    "val": View("val", "tune/val", "tune", "val_acc"),
}
VIEW_ORDER = list(VIEWS)
# not settings, besides the runtime keys (fingerprint.RUNTIME_KEYS: keys that never change a result): the row's own keys, and
# how or from where a run evaluates and loads its weights
NOT_SETTINGS = ("seed", "protocol", "trainer.device", "trainer.eval_batch_size", "model.checkpoint")


@dataclass
class Record(RunRecord):
    """A run record as the report reads it, with its ``path`` relative to the directory given."""
    path: str = ""
    file: Optional[Path] = None

    @cached_property
    def settings(self) -> Dict[str, Any]:
        """The flattened config ({'optim': {'lr': 1}} -> {'optim.lr': 1}; lists stay values) without
        the runtime keys (``runtime_keys`` in configs/config.yaml) and :data:`NOT_SETTINGS`; None counts as absent."""
        return {k: v for k, v in result_config(self.config or {}).items() if v is not None and k not in NOT_SETTINGS}

    backbone = property(lambda self: str(self.settings.get("model.name") or DEFAULT_BACKBONE))

    def value(self, view: View) -> Optional[float]:
        """The accuracy ``view`` reads; None for another protocol, or a max over epochs not selected on test."""
        v = getattr(self, view.field)
        if self.protocol != view.protocol or v is None or (
                view.key == "max" and (self.best_acc_selects_on or "test") != "test"):
            return None
        return float(v)


Collection = namedtuple("Collection", "records issues")  # issues: the unreadable or malformed files, skipped


def load_records(paths: Sequence[os.PathLike]) -> Collection:
    """Every valid results.json under ``paths`` (directories, searched recursively, or files), sorted
    by path. An unreadable or malformed file is skipped and named in ``issues``."""
    found, recs, issues = {}, [], []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
        root = p.parent if p.is_file() else p
        for f in [p] if p.is_file() else sorted(p.rglob(RESULTS)):
            rel = f.relative_to(root).as_posix()  # prefixed with the directory as given when there are several
            found.setdefault(f.resolve(), (f, f"{root.as_posix().rstrip('/')}/{rel}" if len(paths) > 1 else rel))
    for f, rel in found.values():
        try:
            recs.append(replace(Record.read(f), path=rel, file=f))
        except RecordError as e:
            issues.append(f"{'unreadable' if e.unreadable else 'malformed'} {rel}: {'; '.join(e.problems)}")
    return Collection(sorted(recs, key=lambda r: r.path), issues)


# --------------------------------------------------------------------------- grouping

def method_label(method: str, backbone: str) -> str:
    mark = BACKBONE_MARKS.get(backbone)
    return method + (mark if mark is not None else f" [{backbone}]")


def method_rank(method: str) -> Tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _fmt_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else str(v)


def varying(records: Iterable[Record]) -> List[str]:
    """The settings whose values differ among ``records`` (a missing key counts as None)."""
    records = list(records)
    keys = set().union(*(r.settings for r in records))
    return sorted(k for k in keys if len({_fmt_value(r.settings.get(k)) for r in records}) > 1)


ROW_KEY = ["dataset", "method", "backbone", "experiment", "view"]
LONG = ROW_KEY + ["task", "seed", "fp", "path", "record", "value", "params", "params_no_head"]


def group_rows(records: Iterable[Record], views: Sequence[str] = VIEW_ORDER,
               notes: Optional[List[str]] = None) -> pd.DataFrame:
    """Records -> the measurements of the table rows (see the module docstring), one per row, task
    and seed (:data:`LONG`), numbered in table order (``row``), each row with its ``variant`` and
    ``label``. Duplicates and variant splits are appended to ``notes``."""
    notes = notes if notes is not None else []
    df = pd.DataFrame([(r.dataset, r.method, r.backbone, r.experiment or "", v, r.task, r.seed,
                        fingerprint(r.settings), r.path, r, r.value(VIEWS[v]), r.trainable_params,
                        r.trainable_params_no_head)
                       for r in records for v in views if r.value(VIEWS[v]) is not None],
                      columns=LONG).astype({"params": float, "params_no_head": float})
    reported, parts = set(), []
    for (ds, method, bb, exp, view), g in df.groupby(ROW_KEY, sort=False):
        same = ["task", "seed", "fp"]
        for (task, seed, fp), d in g[g.duplicated(same, keep=False)].groupby(same, sort=False):
            if (key := (ds, method, bb, exp, VIEWS[view].protocol, task, seed, fp)) not in reported:  # once per run
                reported.add(key)
                notes.append(f"duplicate: {ds} {method} task={task} seed={seed} protocol={VIEWS[view].protocol} has "
                             f"{len(d)} records with the same config; kept {d.path.iloc[-1]}, ignored "
                             + ", ".join(d.path.iloc[:-1]))
        g = g.drop_duplicates(same, keep="last")
        clashes = g[g.duplicated(["task", "seed"], keep=False)].groupby(["task", "seed"]).record
        keys = sorted(set().union(*(varying(c) for _, c in clashes)))
        if keys:
            notes.append(f"split: {ds} {method} {f'experiment={exp}' if exp else '(no experiment)'} {VIEWS[view].label}"
                         f": records of the same task and seed differ in {', '.join(keys)}; one row per setting")
        parts.append(g.assign(variant=[tuple((k, _fmt_value(r.settings.get(k))) for k in keys) for r in g.record]))
    if not parts:
        return df.assign(variant="", label="", row=0)
    long = pd.concat(parts)
    order = [(ds, method_rank(m), bb != DEFAULT_BACKBONE, bb, exp != "", exp, var, VIEW_ORDER.index(v))
             for ds, m, bb, exp, v, var in zip(*(long[k] for k in ROW_KEY), long.variant)]
    rank = {k: i for i, k in enumerate(sorted(set(order)))}
    long["row"] = [rank[k] for k in order]
    long["variant"] = [", ".join(f"{k}={v}" for k, v in var) for var in long.variant]
    long["label"] = [method_label(m, bb) + (f" ({var})" if var else "")
                     for m, bb, var in zip(long.method, long.backbone, long.variant)]
    return long.sort_values("row", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- selection

class SelectionError(PeftVitError, ValueError):
    pass


# values: ((hyper-parameter, value), ...) of the varying ones; the metric's mean and std (ddof=1; None for one seed)
Candidate = namedtuple("Candidate", "values mean std seeds records")


@dataclass
class Selection:
    method: str
    dataset: str
    task: str
    experiment: Optional[str]
    backbone: str
    metric: str
    keys: List[str]                   # the hyper-parameters that varied
    candidates: List[Candidate]       # ranked, best first
    base_overrides: List[str]         # overrides to reproduce the tuned runs (without the swept keys)
    overrides_exact: bool             # True when taken from the records, False when reconstructed

    best = property(lambda self: self.candidates[0])

    def final_overrides(self, seeds: Sequence[int]) -> List[str]:
        hp = [f"{k}={_override_value(v)}" for k, v in self.best.values]
        return self.base_overrides + hp + ["protocol=final", "seed=" + ",".join(str(s) for s in seeds)]


def _override_value(v: Any) -> str:
    """``v`` as a Hydra command-line value."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(_override_value, v)) + "]"
    if v is None or isinstance(v, (bool, float)):
        return repr(v) if isinstance(v, float) else json.dumps(v)
    s = str(v)
    return s if s and all(c.isalnum() or c in "._-/" for c in s) else json.dumps(s)


def _record_overrides(r: Record) -> Optional[List[str]]:
    """The command-line overrides the run was launched with: the record's ``overrides``, else
    Hydra's ``.hydra/overrides.yaml`` beside it."""
    import yaml

    def strings(x):
        return isinstance(x, list) and all(isinstance(s, str) for s in x)

    ov, hydra = r.overrides, Path(r.file or "").parent / ".hydra" / "overrides.yaml"
    if not strings(ov) and r.file is not None and hydra.is_file():
        try:
            ov = yaml.safe_load(hydra.read_text())
        except (OSError, yaml.YAMLError):
            return None
    return list(ov) if strings(ov) else None


SELECTION_KEY = ["dataset", "method", "task", "experiment", "backbone"]
# listed first, and the documented tie rule after the mean: the smaller lr, then the larger weight decay;
# then the other varying values compared as strings
SWEPT = {"optim.lr": 1, "optim.weight_decay": -1}
_DROP_OVERRIDES = ("protocol", "seed", "hydra", "skip_done")  # never re-emitted from the tuned runs


def _tie_key(k: str, v: Any) -> Tuple[int, float, str]:
    return (0, SWEPT[k] * float(v), "") if k in SWEPT and isinstance(v, (int, float)) else (1, 0.0, _fmt_value(v))


def select_best(records: Sequence[Record], metric: str = "val_acc", ignore_final: bool = False,
                notes: Optional[List[str]] = None) -> List[Selection]:
    """Per (dataset, method, task, experiment, backbone): the hyper-parameters (every setting that
    varies among the tuned runs, typically ``optim.lr`` and ``optim.weight_decay``) with the best
    ``metric`` averaged over seeds (a second run of a candidate and seed: the first kept); ties: :data:`SWEPT`.

    Refuses anything that could select on test: ``final`` records (unless ``ignore_final``,
    which skips them), records evaluated on the test split, and a metric that selects on test."""
    notes = notes if notes is not None else []
    if metric not in ("val_acc", "best_acc_over_epochs"):
        raise SelectionError(f"--metric {metric}: use val_acc (last epoch on val200) or best_acc_over_epochs "
                             "(max over epochs on val200)")

    def on_test(r):
        return (r.protocol != "tune" or r.eval_split == "test" or r.test_acc is not None
                or metric == "best_acc_over_epochs" and "test" in (r.best_acc_selects_on or "test"))

    if bad := [r for r in records if on_test(r)]:
        msg = (f"{len(bad)} record(s) are not tune-protocol validation runs (selecting on them would select "
               f"on test): " + ", ".join(r.path for r in bad[:5]) + (" ..." if len(bad) > 5 else ""))
        if not ignore_final:
            raise SelectionError(msg + "\npoint select_best at tune sweeps only, or pass --ignore-final to skip them")
        notes.append("skipped: " + msg)
    ok = [r for r in records if not on_test(r)]
    notes += [f"skipped {r.path}: no {metric}" for r in ok if getattr(r, metric) is None]
    df = pd.DataFrame([(r.dataset, r.method, r.task, r.experiment or "", r.backbone, r, r.seed, getattr(r, metric))
                       for r in ok if getattr(r, metric) is not None],
                      columns=SELECTION_KEY + ["record", "seed", "score"])
    out = []
    for (ds, method, task, exp, backbone), g in sorted(df.groupby(SELECTION_KEY), key=lambda kv: (
            kv[0][0], method_rank(kv[0][1]), *kv[0][2:])):
        keys = sorted(varying(g.record), key=lambda k: (list(SWEPT).index(k) if k in SWEPT else 2, k))
        g = g.assign(cand=[tuple(_fmt_value(r.settings.get(k)) for k in keys) for r in g.record])
        dup = g.duplicated(["cand", "seed"])
        kept = g[~dup].set_index(["cand", "seed"]).record
        notes += [f"duplicate: {ds} {method} {task} seed={r.seed} {dict(zip(keys, map(r.settings.get, keys)))}: "
                  f"kept the first ({kept[(c, r.seed)].path}), ignored {r.path}"
                  for c, r in zip(g.cand[dup], g.record[dup])]
        ranked = sorted([Candidate(tuple((k, c.record.iloc[0].settings.get(k)) for k in keys), float(c.score.mean()),
                                   float(c.score.std()) if len(c) > 1 else None, c.seed.tolist(), c.record.tolist())
                         for _, c in g[~dup].groupby("cand", sort=False)],
                        key=lambda c: (-round(c.mean, 9), *(_tie_key(k, v) for k, v in c.values)))
        if len(nseeds := {len(c.seeds) for c in ranked}) > 1:
            notes.append(f"uneven: {ds} {method} {task}: candidates have {sorted(nseeds)} seeds")
        ov = _record_overrides(ranked[0].records[0])
        base = ov if ov is not None else [f"experiment={exp}"] * bool(exp) + [f"method={method}",
                                                                              f"dataset={ds}/{task}"]
        base = [o for o in base if not any((k := o.lstrip("+~").split("=", 1)[0]) == d or k.startswith(d + ".")
                                           for d in _DROP_OVERRIDES) and k not in keys]
        out.append(Selection(method, ds, task, exp or None, backbone, metric, keys, ranked, base, ov is not None))
    return out
