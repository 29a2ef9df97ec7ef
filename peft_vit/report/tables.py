"""VTAB-1k and FGVC result tables (Markdown, CSV, LaTeX) from run records.

One row per (method, backbone, experiment, view[, variant]) — see :mod:`.collect` — with
one column per task, the group means, the plain mean, the mean of group means (VTAB), and
the trainable parameters with and without the head (millions, averaged over tasks).

* A cell is the mean ± sample std (ddof=1) over seeds; ``(n=k)`` marks a cell with fewer
  seeds than the row's others.
* A mean is shown only when every task it covers is present; otherwise it reads
  ``incomplete (k/n)`` — never an average over fewer tasks.
* The std of a mean is the std over seeds of the per-seed means, shown when every task of
  the mean has the same ≥ 2 seeds.
* ``--paper`` adds the published rows (``paper_results.yaml``) and, below each of our rows
  of the same method and backbone, the difference ours − paper.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd
from tabulate import DataRow, TableFormat

from .collect import DEFAULT_BACKBONE, VIEW_ORDER, Record, RowData, group_rows, method_label, method_rank

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
    backbone: str = "ViT-B/16"          # named in the table's title

    @property
    def head_m(self) -> Optional[float]:
        return None if self.mean_classes is None else HEAD_IN * self.mean_classes / 1e6


def _registry(dataset: str) -> Dict[str, Any]:
    """The task registry a benchmark follows: ``peft_vit.data.vtab.TASKS``, ``.fgvc.DATASETS`` or
    ``.proxy.TASKS`` (the proxy benchmark's generated tasks and their groups)."""
    from ..data import fgvc, proxy, vtab

    return {"vtab": vtab.TASKS, "fgvc": fgvc.DATASETS, "proxy": proxy.TASKS}.get(dataset, {})


def vtab_tasks() -> Dict[str, str]:
    """task -> group, in the papers' column order, from the task registry."""
    return {t: spec.group for t, spec in _registry("vtab").items()}


def benchmark_for(dataset: str, records: Sequence[Record] = ()) -> Benchmark:
    """Task order, groups and class counts from the registry; other datasets: their tasks found."""
    reg = _registry(dataset)
    if not reg:
        return Benchmark(dataset, dataset, sorted({r.task for r in records if r.dataset == dataset}), {}, "mean")
    groups: Dict[str, List[str]] = {}
    for t, spec in reg.items():
        if getattr(spec, "group", None):
            groups.setdefault(spec.group, []).append(t)
    classes = sum(spec.num_classes for spec in reg.values()) / len(reg)
    if dataset == "proxy":
        return Benchmark(dataset, "Proxy benchmark", list(reg), groups, "mean", classes, "proxy ViT (32 px, width 96)")
    title, mean_title = ("VTAB-1k", f"mean{len(reg)}") if dataset == "vtab" else ("FGVC", "mean")
    return Benchmark(dataset, title, list(reg), groups, mean_title, classes)


def vtab_benchmark() -> Benchmark:
    return benchmark_for("vtab")


def fgvc_benchmark() -> Benchmark:
    return benchmark_for("fgvc")


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
    cols = [Column(t, t, "task") for t in b.tasks] + [Column(g, g, "group") for g in b.groups]
    cols.append(Column("mean", b.mean_title, "mean"))
    return cols + ([Column("mean_of_groups", "mean of groups", "groups_mean")] if b.groups else [])


LONG = ["row", "task", "seed", "value", "head", "no_head"]  # one measurement of a table row


def _cells(long: pd.DataFrame, b: Benchmark, cols: List[Column], rows: Sequence[int]) -> Dict[int, Dict[str, Cell]]:
    """The cells of many rows at once from ``long`` (:data:`LONG`; one value per row, task and
    seed). Task cells: mean, std and count over seeds. A mean column: the mean over its tasks of
    the task means (``groups_mean``: of the group means), only when every task is present; its
    std is over the per-seed means, when every task has the same >= 2 seeds."""
    long = long[long.task.isin(b.tasks)]
    st = long.groupby(["row", "task"]).value.agg(["mean", "std", "count"])  # std: ddof=1, NaN for one seed
    most = st["count"].groupby(level="row").max()
    cells: Dict[int, Dict[str, Cell]] = {r: {} for r in rows}
    for (r, t), m, sd, n in st.itertuples():
        cells[r][t] = Cell(float(m), None if pd.isna(sd) else float(sd), int(n), few_seeds=bool(n < most[r]))
    means = st["mean"].unstack("task").reindex(index=list(rows), columns=b.tasks)   # rows × tasks
    seeds = long.pivot(index=["row", "seed"], columns="task", values="value").reindex(columns=b.tasks)
    group_of = {t: g for g, ts in b.groups.items() for t in ts}
    for c in cols[len(b.tasks):]:
        span = b.groups[c.key] if c.kind == "group" else b.tasks

        def agg(x: pd.DataFrame) -> pd.Series:  # one value per index entry of x
            return x[span].T.groupby(group_of).mean().mean() if c.kind == "groups_mean" else x[span].mean(axis=1)

        have = means[span].notna().sum(axis=1)
        mean = agg(means)
        per_seed = seeds[span].dropna(how="all")
        same = per_seed.notna().all(axis=1).groupby(level="row").agg(["all", "size"])
        std = agg(per_seed).groupby(level="row").std()
        for r in rows:
            ok = r in same.index and same.loc[r, "all"] and same.loc[r, "size"] >= 2
            cells[r][c.key] = (Cell(float(mean[r]), float(std[r]) if ok else None, len(span)) if have[r] == len(span)
                               else Cell(incomplete=(int(have[r]), len(span)), n=int(have[r])))
    return cells


def _seed_sort(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def our_rows(rows: Sequence[RowData], b: Benchmark, cols: List[Column]) -> List[Row]:
    long = pd.DataFrame([(i, e.task, str(e.seed), e.value, e.record.data.get("trainable_params", math.nan),
                          e.record.data.get("trainable_params_no_head", math.nan))
                         for i, rd in enumerate(rows) for e in rd.entries], columns=LONG)
    cells = _cells(long, b, cols, range(len(rows)))
    # params: per task the mean over seeds, then the mean over the tasks present
    p = long[long.task.isin(b.tasks) & long["head"].notna()]
    per_task = p.groupby(["row", "task"])[["head", "no_head"]].mean()
    params = per_task.groupby(level="row").mean() / 1e6
    params.loc[params.index.isin(p.row[p.no_head.isna()]), "no_head"] = math.nan  # a run without it: no mean
    ntasks = per_task.groupby(level="row").size()
    out = []
    for i, rd in enumerate(rows):
        seeds = sorted({str(e.seed) for e in rd.entries if e.task in b.tasks}, key=_seed_sort)
        r = Row("ours", rd.method, rd.method_label, rd.backbone, rd.view.label, rd.experiment or "",
                variant=", ".join(f"{k}={v}" for k, v in rd.variant), seeds=",".join(seeds), cells=cells[i])
        if i in params.index:
            head, no_head = params.loc[i]
            r.params_head, r.params_no_head = float(head), None if pd.isna(no_head) else float(no_head)
            r.params_partial = ntasks[i] < len(b.tasks)
        out.append(r)
    return out


# --------------------------------------------------------------------------- paper rows

def load_paper(path: Path = PAPER_FILE) -> Dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def paper_rows(b: Benchmark, cols: List[Column], paper: Optional[Dict[str, Any]] = None) -> List[Row]:
    paper = paper if paper is not None else load_paper()
    out = []
    for p in paper.get(b.name) or []:
        r = Row("paper", p["method"], method_label(p["method"], p["backbone"]), p["backbone"],
                paper.get("protocol", PAPER_PROTOCOL), p.get("cite") or p.get("source", ""), decimals=1,
                params_printed=True)
        inc = p.get("params_include_head")
        if inc is False:
            r.params_no_head = float(p["params_m"])
        else:
            r.params_head, r.params_head_known = float(p["params_m"]), inc is True
        out.append(r)
    long = pd.DataFrame([(i, t, "paper", float(v), math.nan, math.nan) for i, p in enumerate(paper.get(b.name) or [])
                         for t, v in p["acc"].items()], columns=LONG)
    for r, c in zip(out, _cells(long, b, cols, range(len(out))).values()):
        r.cells = c
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


def build_table(records: Sequence[Record], dataset: str = "vtab", views: Sequence[str] = VIEW_ORDER,
                paper: bool = False, notes: Optional[List[str]] = None,
                paper_data: Optional[Dict[str, Any]] = None) -> Table:
    """The table of one benchmark from run records."""
    b = benchmark_for(dataset, records)
    cols = columns_for(b)
    notes = list(notes or [])
    rows_data = group_rows([r for r in records if r.dataset == dataset], views, notes)
    for rd in rows_data:
        unknown = sorted({e.task for e in rd.entries} - set(b.tasks))
        if unknown:
            notes.append(f"ignored tasks not in {b.title}: {', '.join(unknown)} ({rd.method_label}, {rd.view.label})")
    ours = our_rows(rows_data, b, cols)
    for r in ours:
        if any(r.cells[c.key].incomplete for c in cols if c.kind != "task"):
            notes.append(f"incomplete: {r.method_label} {r.protocol} {r.experiment}".rstrip()
                         + f": missing {', '.join(t for t in b.tasks if t not in r.cells)}")
    if not paper:
        return Table(b, cols, ours, notes)

    by_method: Dict[tuple, Row] = {}
    for p in paper_rows(b, cols, paper_data):
        by_method.setdefault((p.method, p.backbone), p)
    rows: List[Row] = []
    for k in sorted({(r.method, r.backbone) for r in ours} | set(by_method),
                    key=lambda k: (method_rank(k[0]), k[1] != DEFAULT_BACKBONE, k[1])):
        p = by_method.get(k)
        rows += [p] if p is not None else []
        for r in (r for r in ours if (r.method, r.backbone) == k):
            rows += [r, diff_row(r, p, cols)] if p is not None and not r.protocol.startswith("tune") else [r]
    return Table(b, cols, rows, notes)


# --------------------------------------------------------------------------- render

def _cell_text(cell: Optional[Cell], row: Row, col: Column, fmt: str) -> str:
    if cell is None or (cell.mean is None and not cell.incomplete):
        return ""
    if cell.incomplete:
        return "incomplete ({}/{})".format(*cell.incomplete)
    s = f"{cell.mean:{'+' if row.kind == 'diff' else ''}.{row.decimals if col.kind == 'task' else 2}f}"
    s = "0.00" if row.kind == "diff" and s in ("+0.00", "-0.00") else s
    if cell.std is not None:
        s += rf"{{\scriptsize$\pm${cell.std:.2f}}}" if fmt == "tex" else f" ± {cell.std:.2f}"
    if cell.few_seeds:
        s += rf" {{\scriptsize(n={cell.n})}}" if fmt == "tex" else f" (n={cell.n})"
    return s


def _params_text(row: Row, head: bool) -> str:
    v = row.params_head if head else row.params_no_head
    if v is None:
        return ""
    if row.params_printed:
        return f"{v:.2f}" + ("?" if head and not row.params_head_known else "")
    return f"{v:.3f}" + ("†" if row.params_partial else "")


HEADER = ["method", "protocol", "experiment"]
PARAMS_HEADER = ["params M (+head)", "params M (no head)"]


def _row_texts(t: Table, row: Row, fmt: str) -> Tuple[List[str], List[str], List[str]]:
    """(leading texts, cells, trailing texts) of a row; cells are already in ``fmt``."""
    return ([row.method_label, row.protocol, row.experiment],
            [_cell_text(row.cells.get(c.key), row, c, fmt) for c in t.columns],
            [_params_text(row, True), _params_text(row, False), row.seeds])


def _title(t: Table) -> str:
    return f"{t.benchmark.title} — {t.benchmark.backbone}, top-1 accuracy (%)"


def _pipe_rule(widths: List[int], aligns) -> str:
    """The Markdown header rule: text columns left-aligned, numbers right-aligned."""
    return "|" + "|".join([":--"] * len(HEADER) + ["--:"] * (len(widths) - len(HEADER))) + "|"


# tabulate's "pipe" format without padding the columns to a common width
PIPE = TableFormat(None, _pipe_rule, None, None, DataRow("|", "|", "|"), DataRow("|", "|", "|"), 1, None)


def to_markdown(t: Table) -> str:
    def texts(row: Row) -> List[str]:
        lead, cells, tail = _row_texts(t, row, "md")
        out = [x.replace("|", "\\|").replace("*", "\\*") for x in lead + cells + tail]
        return [f"*{out[0]}*" if row.kind == "paper" else out[0]] + out[1:]

    head = HEADER + [c.title for c in t.columns] + PARAMS_HEADER + ["seeds"]
    md = pd.DataFrame([texts(r) for r in t.rows], columns=head).to_markdown(
        index=False, tablefmt=PIPE, stralign=None, numalign=None, disable_numparse=True)
    notes = ["", "Notes:", *[f"- {x}" for x in t.notes]] if t.notes else []
    return "\n".join([f"## {_title(t)}", "", md, "", *[f"- {x}" for x in LEGEND], *notes]) + "\n"


def to_csv(t: Table) -> str:
    def f(x, dec=4):
        return "" if x is None else f"{x:.{dec}f}"

    head = ["kind", "method", "backbone", "variant", "protocol", "experiment", "seeds"]
    for c in t.columns:
        head += [c.key, f"{c.key}_std", f"{c.key}_n" if c.kind == "task" else f"{c.key}_n_tasks"]
    head += ["params_m_with_head", "params_m_no_head", "params_partial", "complete"]
    rows = []
    for row in t.rows:
        out = [row.kind, row.method, row.backbone, row.variant, row.protocol, row.experiment, row.seeds]
        for c in t.columns:
            cell = row.cells.get(c.key)
            n = str(cell.n) if cell is not None else ("0" if c.kind == "task" else "")
            out += [f(cell.mean), f(cell.std), n] if cell is not None and cell.mean is not None else ["", "", n]
        complete = all(row.cells.get(c.key) is not None and row.cells[c.key].mean is not None for c in t.columns)
        out += [f(row.params_head, 6), f(row.params_no_head, 6), str(row.params_partial).lower(), str(complete).lower()]
        rows.append(out)
    return pd.DataFrame(rows, columns=head).to_csv(index=False, lineterminator="\n")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "†": r"$^\dagger$", "Δ": r"$\Delta$", "−": r"$-$", "→": r"$\to$", "—": "--",
        "§": r"\S{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    rows, prev = [], None
    for row in t.rows:
        lead, cells, tail = _row_texts(t, row, "tex")
        lead, tail = [tex_escape(x) for x in lead], [tex_escape(x) for x in tail]
        lead[0] = rf"\textit{{{lead[0]}}}" if row.kind == "paper" else lead[0]
        if prev not in (None, (row.method, row.backbone)):  # a rule between method groups
            lead[0] = "\\midrule\n" + lead[0]
        prev = (row.method, row.backbone)
        rows.append(lead + cells + tail)
    head = [tex_escape(h) for h in HEADER] + [rf"\rotatebox{{90}}{{{tex_escape(h)}}}"
                                              for h in [c.title for c in t.columns] + PARAMS_HEADER] + ["seeds"]
    body = pd.DataFrame(rows, columns=head).to_latex(
        index=False, escape=False, column_format="l" * len(HEADER) + "r" * (len(head) - len(HEADER)))
    return "\n".join([f"% {_title(t)}", "% generated by scripts/make_table.py; needs \\usepackage{booktabs,graphicx}",
                      body.rstrip("\n"), *[f"% {tex_escape(x)}" for x in LEGEND + t.notes]]) + "\n"


RENDERERS = {"md": (to_markdown, "md"), "csv": (to_csv, "csv"), "tex": (to_latex, "tex")}


def safe_stems(names: Iterable[str]) -> Dict[str, str]:
    """Dataset name -> a file-name stem: anything but letters, digits, '.', '_' and '-' becomes
    '_' (``vtab/caltech101`` -> ``vtab_caltech101``); names that would share a stem get a hash."""
    stems = {n: re.sub(r"[^A-Za-z0-9._-]+", "_", n).strip("._") or "dataset" for n in names}
    return {n: s if list(stems.values()).count(s) == 1 else f"{s}_{hashlib.sha1(n.encode()).hexdigest()[:8]}"
            for n, s in stems.items()}


def write_table(t: Table, out_dir: Path, formats: Sequence[str] = ("md", "csv", "tex"),
                stem: Optional[str] = None) -> List[Path]:
    """Writes <out_dir>/<stem>.<ext>; the stem defaults to the benchmark's name made safe."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or safe_stems([t.benchmark.name])[t.benchmark.name]
    paths = [out_dir / f"{stem}.{RENDERERS[f][1]}" for f in formats]
    for f, p in zip(formats, paths):
        p.write_text(RENDERERS[f][0](t))
    return paths
