"""VTAB-1k and FGVC result tables (Markdown, CSV, LaTeX) from run records.

One row per (method, backbone, experiment, view[, variant]) — see :mod:`.collect` — with
one column per task, the group means, the plain mean, the mean of group means (VTAB), and
the trainable parameters with and without the head (millions, averaged over tasks).

* A cell is the mean ± sample std over seeds; ``(n=k)`` marks a cell with fewer seeds than
  the row's others.
* A mean is shown only when every task it covers is present; otherwise it reads
  ``incomplete (k/n)`` — never an average over fewer tasks.
* The std of a mean is the std over seeds of the per-seed means, shown when every task of
  the mean has the same ≥ 2 seeds.
* ``--paper`` adds the published rows (``paper_results.yaml``) and, below each of our rows
  of the same method and backbone, the difference ours − paper.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .collect import (BACKBONE_MARKS, DEFAULT_BACKBONE, Record, RowData, _std, group_rows, method_rank)

PAPER_FILE = Path(__file__).with_name("paper_results.yaml")
PAPER_PROTOCOL = "paper: max test acc over epochs"
HEAD_IN = 768 + 1  # a Linear(768, C) head: 769 parameters per class


# --------------------------------------------------------------------------- benchmarks

@dataclass
class Benchmark:
    name: str                           # dataset name in the records: vtab | fgvc | ...
    title: str
    tasks: List[str]
    groups: Dict[str, List[str]]        # ordered; empty when the benchmark has none
    mean_title: str
    mean_classes: Optional[float] = None  # for the mean head size

    @property
    def head_m(self) -> Optional[float]:
        return None if self.mean_classes is None else HEAD_IN * self.mean_classes / 1e6


def vtab_tasks() -> Dict[str, str]:
    """task -> group, in the papers' column order, from the task registry."""
    from ..data.vtab import TASKS

    return {t: TASKS[t].group for t in TASKS}


def vtab_benchmark() -> Benchmark:
    """Task order, groups and class counts from ``peft_vit.data.vtab.TASKS``."""
    from ..data.vtab import TASKS

    tasks = list(TASKS)
    groups: Dict[str, List[str]] = {}
    for t in tasks:
        groups.setdefault(TASKS[t].group, []).append(t)
    mean_classes = sum(TASKS[t].num_classes for t in tasks) / len(tasks)
    return Benchmark("vtab", "VTAB-1k", tasks, groups, f"mean{len(tasks)}", mean_classes)


def fgvc_benchmark() -> Benchmark:
    """Dataset order and class counts from ``peft_vit.data.fgvc.DATASETS``."""
    from ..data.fgvc import DATASETS

    names = list(DATASETS)
    mean_classes = sum(DATASETS[n].num_classes for n in names) / len(names)
    return Benchmark("fgvc", "FGVC", names, {}, "mean", mean_classes)


def benchmark_for(dataset: str, records: Sequence[Record] = ()) -> Benchmark:
    if dataset == "vtab":
        return vtab_benchmark()
    if dataset == "fgvc":
        return fgvc_benchmark()
    tasks = sorted({r.task for r in records if r.dataset == dataset})
    return Benchmark(dataset, dataset, tasks, {}, "mean")


# --------------------------------------------------------------------------- table model

@dataclass
class Cell:
    mean: Optional[float] = None
    std: Optional[float] = None
    n: int = 0                              # seeds (task cells) or tasks (means)
    incomplete: Optional[Tuple[int, int]] = None   # (present, needed) for an incomplete mean
    few_seeds: bool = False                 # fewer seeds than the row's others


@dataclass
class Column:
    key: str
    title: str
    kind: str        # task | group | mean | groups_mean


@dataclass
class Row:
    kind: str                     # ours | paper | diff
    method: str
    method_label: str
    backbone: str
    protocol: str
    experiment: str               # experiment name, or the paper's short citation
    variant: str = ""
    seeds: str = ""
    cells: Dict[str, Cell] = field(default_factory=dict)
    params_head: Optional[float] = None      # M
    params_no_head: Optional[float] = None   # M
    params_partial: bool = False             # averaged over the tasks present only
    params_printed: bool = False             # paper: the printed value (not ours)
    params_head_known: bool = True           # paper: whether the printed count is known to include the head
    decimals: int = 2


@dataclass
class Table:
    benchmark: Benchmark
    columns: List[Column]
    rows: List[Row]
    notes: List[str]


def columns_for(b: Benchmark) -> List[Column]:
    cols = [Column(t, t, "task") for t in b.tasks]
    cols += [Column(g, g, "group") for g in b.groups]
    cols.append(Column("mean", b.mean_title, "mean"))
    if b.groups:
        cols.append(Column("mean_of_groups", "mean of groups", "groups_mean"))
    return cols


def _span(col: Column, b: Benchmark) -> List[str]:
    """The tasks an aggregate column covers."""
    if col.kind == "group":
        return b.groups[col.key]
    return list(b.tasks)


def _aggregate(col: Column, b: Benchmark, per_task: Dict[str, Dict[str, float]]) -> Cell:
    """per_task: task -> {seed: value}. The mean of the task means (mean of group means for
    groups_mean), only when complete; std over seeds of per-seed aggregates when every task
    has the same seeds (>= 2)."""
    span = _span(col, b)
    have = [t for t in span if t in per_task]
    if len(have) < len(span):
        return Cell(incomplete=(len(have), len(span)), n=len(have))

    def agg(values: Dict[str, float]) -> float:
        if col.kind == "groups_mean":
            gm = [sum(values[t] for t in ts) / len(ts) for ts in b.groups.values()]
            return sum(gm) / len(gm)
        return sum(values[t] for t in span) / len(span)

    means = {t: sum(per_task[t].values()) / len(per_task[t]) for t in span}
    cell = Cell(mean=agg(means), n=len(span))
    seedsets = {tuple(sorted(per_task[t])) for t in span}
    if len(seedsets) == 1:
        seeds = next(iter(seedsets))
        if len(seeds) >= 2:
            cell.std = _std([agg({t: per_task[t][s] for t in span}) for s in seeds])
    return cell


def _seed_str(s: Any) -> str:
    return str(s)


def _seed_sort(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def our_row(row: RowData, b: Benchmark, cols: List[Column]) -> Row:
    per_task: Dict[str, Dict[str, float]] = {}
    params: Dict[str, List[Tuple[float, float]]] = {}
    for e in row.entries:
        per_task.setdefault(e.task, {})[_seed_str(e.seed)] = e.value
        d = e.record.data
        if isinstance(d.get("trainable_params"), (int, float)):
            params.setdefault(e.task, []).append((float(d["trainable_params"]),
                                                  float(d.get("trainable_params_no_head", math.nan))))
    per_task_known = {t: v for t, v in per_task.items() if t in b.tasks}
    seeds = sorted({s for v in per_task_known.values() for s in v}, key=_seed_sort)
    maxn = max((len(v) for v in per_task_known.values()), default=0)
    out = Row("ours", row.method, row.method_label, row.backbone, row.view.label, row.experiment or "",
              variant=", ".join(f"{k}={v}" for k, v in row.variant), seeds=",".join(seeds))
    for c in cols:
        if c.kind == "task":
            vals = per_task_known.get(c.key)
            if vals:
                xs = [vals[s] for s in sorted(vals, key=_seed_sort)]
                out.cells[c.key] = Cell(sum(xs) / len(xs), _std(xs), len(xs), few_seeds=len(xs) < maxn)
        else:
            out.cells[c.key] = _aggregate(c, b, per_task_known)
    ptasks = [t for t in b.tasks if t in params]
    if ptasks:
        head = [sum(p for p, _ in params[t]) / len(params[t]) for t in ptasks]
        nohead = [sum(p for _, p in params[t]) / len(params[t]) for t in ptasks]
        out.params_head = sum(head) / len(head) / 1e6
        nh = sum(nohead) / len(nohead) / 1e6
        out.params_no_head = None if math.isnan(nh) else nh
        out.params_partial = len(ptasks) < len(b.tasks)
    return out


# --------------------------------------------------------------------------- paper rows

def load_paper(path: Path = PAPER_FILE) -> Dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def paper_rows(b: Benchmark, cols: List[Column], paper: Optional[Dict[str, Any]] = None) -> List[Row]:
    paper = paper if paper is not None else load_paper()
    out = []
    for p in paper.get(b.name) or []:
        per_task = {t: {"paper": float(v)} for t, v in p["acc"].items() if t in b.tasks}
        mark = BACKBONE_MARKS.get(p["backbone"])
        label = p["method"] + (mark if mark is not None else f" [{p['backbone']}]")
        r = Row("paper", p["method"], label, p["backbone"], paper.get("protocol", PAPER_PROTOCOL),
                p.get("cite") or p.get("source", ""), seeds="", decimals=1)
        for c in cols:
            if c.kind == "task":
                if c.key in per_task:
                    r.cells[c.key] = Cell(per_task[c.key]["paper"], None, 1)
            else:
                r.cells[c.key] = _aggregate(c, b, per_task)
        inc = p.get("params_include_head")
        r.params_printed = True
        if inc is False:
            r.params_no_head = float(p["params_m"])
        else:
            r.params_head = float(p["params_m"])
            r.params_head_known = inc is True
        out.append(r)
    return out


def diff_row(ours: Row, paper: Row, cols: List[Column]) -> Row:
    r = Row("diff", ours.method, ours.method_label, ours.backbone, f"Δ {ours.protocol} − paper",
            f"{ours.experiment or '—'} − {paper.experiment}", variant=ours.variant, seeds=ours.seeds)
    for c in cols:
        a, p = ours.cells.get(c.key), paper.cells.get(c.key)
        if a and p and a.mean is not None and p.mean is not None:
            r.cells[c.key] = Cell(a.mean - p.mean, None, a.n)
        elif c.kind != "task" and a and a.incomplete:
            r.cells[c.key] = Cell(incomplete=a.incomplete)
    return r


# --------------------------------------------------------------------------- build

LEGEND = [
    "final/last-epoch: test accuracy of the last epoch (train800val200 → test; FGVC train+val → test).",
    "final/max-over-epochs (selects on test): the best test accuracy over the evaluated epochs — "
    "the papers' protocol; it selects on test.",
    "tune/val: validation accuracy of the last epoch (train800 → val200).",
    f"{PAPER_PROTOCOL}: numbers as printed in the cited paper (one run); its means are recomputed here "
    "from the printed per-task values.",
    "Cells: mean ± sample std over seeds; (n=k): fewer seeds than the row's others. "
    "Means appear only for complete rows (incomplete (k/n) otherwise); their std is over per-seed means.",
    "Params: trainable parameters in millions, averaged over tasks; † averaged over the tasks present "
    "only; paper rows show the printed count in the column it matches (? = unknown whether it includes "
    "the head). * = ViT-B/16 AugReg IN-21k backbone.",
]


def build_table(records: Sequence[Record], dataset: str = "vtab", views: Sequence[str] = ("last", "max", "val"),
                paper: bool = False, notes: Optional[List[str]] = None,
                paper_data: Optional[Dict[str, Any]] = None) -> Table:
    """The table of one benchmark from run records."""
    b = benchmark_for(dataset, records)
    cols = columns_for(b)
    notes = list(notes or [])
    rows_data = group_rows([r for r in records if r.dataset == dataset], views, notes)
    ours = []
    for rd in rows_data:
        unknown = sorted({e.task for e in rd.entries} - set(b.tasks))
        if unknown:
            notes.append(f"ignored tasks not in {b.title}: {', '.join(unknown)} ({rd.method_label}, {rd.view.label})")
        ours.append(our_row(rd, b, cols))
    for r in ours:
        inc = [c.title for c in cols if c.kind != "task" and r.cells.get(c.key) and r.cells[c.key].incomplete]
        if inc:
            missing = [t for t in b.tasks if t not in r.cells]
            notes.append(f"incomplete: {r.method_label} {r.protocol} {r.experiment or ''}".rstrip()
                         + f": missing {', '.join(missing)}")
    if not paper:
        return Table(b, cols, ours, notes)

    prow = paper_rows(b, cols, paper_data)
    by_method: Dict[tuple, Row] = {}
    for p in prow:
        by_method.setdefault((p.method, p.backbone), p)
    keys = sorted({(r.method, r.backbone) for r in ours} | set(by_method),
                  key=lambda k: (method_rank(k[0]), k[1] != DEFAULT_BACKBONE, k[1]))
    rows: List[Row] = []
    for k in keys:
        p = by_method.get(k)
        if p is not None:
            rows.append(p)
        for r in (r for r in ours if (r.method, r.backbone) == k):
            rows.append(r)
            if p is not None and not r.protocol.startswith("tune"):
                rows.append(diff_row(r, p, cols))
    return Table(b, cols, rows, notes)


# --------------------------------------------------------------------------- render

def _num(x: float, decimals: int, signed: bool = False) -> str:
    s = f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"
    return "0.00" if signed and s in ("+0.00", "-0.00") else s


def _cell_text(cell: Optional[Cell], row: Row, col: Column, fmt: str) -> str:
    if cell is None:
        return ""
    if cell.incomplete:
        k, n = cell.incomplete
        return f"incomplete ({k}/{n})"
    if cell.mean is None:
        return ""
    dec = row.decimals if col.kind == "task" else 2
    s = _num(cell.mean, dec, signed=row.kind == "diff")
    if cell.std is not None:
        s += (rf"{{\scriptsize$\pm${cell.std:.2f}}}" if fmt == "tex" else f" ± {cell.std:.2f}")
    if cell.few_seeds:
        s += rf" {{\scriptsize(n={cell.n})}}" if fmt == "tex" else f" (n={cell.n})"
    return s


def _params_text(row: Row, head: bool) -> str:
    v = row.params_head if head else row.params_no_head
    if v is None:
        return ""
    if row.params_printed:
        s = f"{v:.2f}"
        if head and not row.params_head_known:
            s += "?"
        return s
    s = f"{v:.3f}"
    return s + ("†" if row.params_partial else "")


HEADER = ["method", "protocol", "experiment"]


def _row_texts(t: Table, row: Row, fmt: str) -> List[str]:
    cells = [_cell_text(row.cells.get(c.key), row, c, fmt) for c in t.columns]
    return ([row.method_label, row.protocol, row.experiment] + cells
            + [_params_text(row, True), _params_text(row, False), row.seeds])


def _title(t: Table) -> str:
    return f"{t.benchmark.title} — ViT-B/16, top-1 accuracy (%)"


def to_markdown(t: Table) -> str:
    head = HEADER + [c.title for c in t.columns] + ["params M (+head)", "params M (no head)", "seeds"]
    lines = [f"## {_title(t)}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join([":--"] * len(HEADER) + ["--:"] * (len(head) - len(HEADER))) + "|"]
    for row in t.rows:
        texts = [x.replace("|", "\\|").replace("*", "\\*") for x in _row_texts(t, row, "md")]
        if row.kind == "paper":
            texts[0] = f"*{texts[0]}*"
        lines.append("| " + " | ".join(texts) + " |")
    lines += ["", *[f"- {x}" for x in LEGEND]]
    if t.notes:
        lines += ["", "Notes:", *[f"- {x}" for x in t.notes]]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["kind", "method", "backbone", "variant", "protocol", "experiment", "seeds"]
    for c in t.columns:
        head += [c.key, f"{c.key}_std", f"{c.key}_n" if c.kind == "task" else f"{c.key}_n_tasks"]
    head += ["params_m_with_head", "params_m_no_head", "params_partial", "complete"]
    w.writerow(head)

    def f(x, dec=4):
        return "" if x is None else f"{x:.{dec}f}"

    for row in t.rows:
        out = [row.kind, row.method, row.backbone, row.variant, row.protocol, row.experiment, row.seeds]
        for c in t.columns:
            cell = row.cells.get(c.key)
            if cell is None or cell.mean is None:
                out += ["", "", str(cell.n) if cell is not None else ("0" if c.kind == "task" else "")]
            else:
                out += [f(cell.mean), f(cell.std), str(cell.n)]
        complete = all(row.cells.get(c.key) is not None and row.cells[c.key].mean is not None for c in t.columns)
        out += [f(row.params_head, 6), f(row.params_no_head, 6), str(row.params_partial).lower(),
                str(complete).lower()]
        w.writerow(out)
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "†": r"$^\dagger$", "Δ": r"$\Delta$", "−": r"$-$", "→": r"$\to$", "—": "--",
        "§": r"\S{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    ncols = len(HEADER) + len(t.columns) + 3
    head = [tex_escape(h) for h in HEADER] + [rf"\rotatebox{{90}}{{{tex_escape(c.title)}}}" for c in t.columns] \
        + [r"\rotatebox{90}{params M (+head)}", r"\rotatebox{90}{params M (no head)}", "seeds"]
    lines = [f"% {_title(t)}", "% generated by scripts/make_table.py; needs \\usepackage{booktabs,graphicx}",
             r"\begin{tabular}{" + "l" * len(HEADER) + "r" * (ncols - len(HEADER)) + "}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    prev = None
    for row in t.rows:
        key = (row.method, row.backbone)
        if prev is not None and key != prev:
            lines.append(r"\midrule")
        prev = key
        texts = _row_texts(t, row, "tex")
        cells = [tex_escape(x) for x in texts[:len(HEADER)]]
        cells += texts[len(HEADER):len(HEADER) + len(t.columns)]  # already TeX (numbers, \pm)
        cells += [tex_escape(x) for x in texts[len(HEADER) + len(t.columns):]]
        if row.kind == "paper":
            cells[0] = rf"\textit{{{cells[0]}}}"
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {tex_escape(x)}" for x in LEGEND + t.notes]
    return "\n".join(lines) + "\n"


RENDERERS = {"md": (to_markdown, "md"), "csv": (to_csv, "csv"), "tex": (to_latex, "tex")}


def write_table(t: Table, out_dir: Path, formats: Sequence[str] = ("md", "csv", "tex"), stem: Optional[str] = None) -> List[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in formats:
        fn, ext = RENDERERS[f]
        p = out_dir / f"{stem or t.benchmark.name}.{ext}"
        p.write_text(fn(t))
        paths.append(p)
    return paths
