"""VTAB-1k and FGVC result tables (Markdown, CSV, LaTeX) from run records.

One row per (method, backbone, experiment, view[, variant]) — see :mod:`.collect` — with one column
per task, the group means, the plain mean, the mean of group means (VTAB), and the trainable
parameters with and without the head. Its rules (a cell's std and seed count, means only for
complete rows, the std of a mean, paper rows with ours − paper below our rows) are printed under
every table (:data:`LEGEND`) and computed by :func:`cells_of` and :func:`build_table`.

A :class:`Table`'s ``rows`` is one frame, a line per table row: what the row is (:data:`META`), then per
column ``k``: ``k`` the mean, ``k_std``, ``k_n`` the seeds or tasks present (the CSV's columns).
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import pandas as pd
from tabulate import DataRow, TableFormat

from .collect import BACKBONE_MARKS, DEFAULT_BACKBONE, VIEW_ORDER, VIEWS, Record, group_rows, method_label, method_rank

PAPER_FILE = Path(__file__).with_name("paper_results.yaml")
PAPER_PROTOCOL = "paper: max test acc over epochs"


# --------------------------------------------------------------------------- benchmarks

@dataclass
class Benchmark:
    name: str                           # dataset name in the records: vtab | fgvc | ...
    title: str
    tasks: List[str]
    groups: Dict[str, List[str]]        # ordered; empty when the benchmark has none
    mean_title: str = "mean"
    head_m: Optional[float] = None      # the parameters (M) of the mean head, Linear(768, mean classes)
    backbone: str = "ViT-B/16"          # named in the table's title

    @property
    def spans(self) -> Dict[str, List[str]]:
        """Column key -> the tasks it covers, in column order."""
        means = {"mean": self.tasks, **({"mean_of_groups": self.tasks} if self.groups else {})}
        return {**{t: [t] for t in self.tasks}, **self.groups, **means}

    @property
    def titles(self) -> List[str]:
        return [{"mean": self.mean_title, "mean_of_groups": "mean of groups"}.get(k, k) for k in self.spans]


def benchmark_for(dataset: str, records: Sequence[Record] = ()) -> Benchmark:
    """Title, task order, groups and class counts from the benchmark its data source registers
    (``peft_vit.data.get_benchmark``); another dataset: the tasks its records have."""
    from ..data import get_benchmark

    registered = get_benchmark(dataset)
    if registered is None:
        tasks = sorted({r.task for r in records if r.dataset == dataset})
        if clash := sorted(set(tasks) & set(META)):
            raise ValueError(f"{dataset}: the task names {clash} are table columns; rename these tasks")
        return Benchmark(dataset, dataset, tasks, {})
    groups: Dict[str, List[str]] = {}
    reg = registered.tasks
    for t, spec in reg.items():
        if getattr(spec, "group", None):
            groups.setdefault(spec.group, []).append(t)
    return Benchmark(dataset, registered.title, list(reg), groups, registered.mean_title.format(n=len(reg)),
                     (768 + 1) * (sum(s.num_classes for s in reg.values()) / len(reg)) / 1e6, registered.backbone)


def vtab_tasks() -> Dict[str, str]:
    """task -> group, in the papers' column order, from the task registry."""
    from ..data import get_benchmark

    return {t: spec.group for t, spec in get_benchmark("vtab").tasks.items()}


# --------------------------------------------------------------------------- cells

# what a table row is: ours | paper | diff, ..., the parameters (M) with and without the head, whether
# they are averaged over the tasks present only, and known to include the head (a paper's count)
META = ["kind", "method", "label", "backbone", "variant", "protocol", "experiment", "seeds", "params_head",
        "params_no_head", "partial", "head_known"]


Table = namedtuple("Table", "benchmark rows notes")  # rows: META, then per column key k: k (the mean), k_std, k_n


def cells_of(long: pd.DataFrame, b: Benchmark, rows: pd.Index) -> pd.DataFrame:
    """The cells of ``rows`` from ``long`` (row, task, seed, value; one value per row, task and seed).
    Each column aggregates the task means over its span (a task: itself; ``mean_of_groups``: the
    mean of the group means), only when every task is present; its std is over seeds of the same
    aggregate of the per-seed values, when every task has the same >= 2 seeds; ``_n`` counts the
    seeds of a task, the tasks present of a mean."""
    long = long[long.task.isin(b.tasks)]
    seeds = long.pivot(index=["row", "seed"], columns="task", values="value").reindex(columns=b.tasks)
    means = long.groupby(["row", "task"]).value.mean().unstack("task").reindex(index=rows, columns=b.tasks)
    group_of = {t: g for g, ts in b.groups.items() for t in ts}
    out = {}
    for key, span in b.spans.items():
        def agg(x: pd.DataFrame) -> pd.Series:  # one value per index entry of x
            return x[span].T.groupby(group_of).mean().mean() if key == "mean_of_groups" else x[span].mean(axis=1)

        per_seed = seeds[span].dropna(how="all")
        same = per_seed.notna().all(axis=1).groupby(level="row").agg(["all", "size"]).reindex(rows)
        std = agg(per_seed).groupby(level="row").std().reindex(rows)
        have = means[span].notna().sum(axis=1)
        full = have == len(span)
        out |= {key: agg(means).where(full), f"{key}_std": std.where(full & same["all"].eq(True) & same["size"].ge(2)),
                f"{key}_n": same["size"].fillna(0).astype(int) if key in b.tasks else have}
    return pd.DataFrame(out, index=rows)


def our_rows(long: pd.DataFrame, b: Benchmark) -> pd.DataFrame:
    """The rows of our measurements (:func:`.collect.group_rows`)."""
    g, ok = long.groupby("row"), long[long.task.isin(b.tasks)]
    rows = g[["method", "label", "backbone", "experiment", "variant"]].first()
    rows.insert(0, "kind", "ours")
    rows["protocol"] = g.view.first().map(lambda v: VIEWS[v].label)
    rows["seeds"] = ok.groupby("row").seed.agg(lambda s: ",".join(map(str, sorted(set(s))))).reindex(rows.index,
                                                                                                   fill_value="")
    # params: per task the mean over seeds, then the mean over the tasks present; a run without the
    # count without head: no mean of it
    p = ok[ok.params.notna()]
    per_task = p.groupby(["row", "task"])[["params", "params_no_head"]].mean()
    params = (per_task.groupby(level="row").mean() / 1e6).reindex(rows.index)
    rows["params_head"] = params.params
    rows["params_no_head"] = params.params_no_head.mask(rows.index.isin(p.row[p.params_no_head.isna()]))
    rows["partial"] = per_task.groupby(level="row").size().reindex(rows.index, fill_value=len(b.tasks)) < len(b.tasks)
    rows["head_known"] = True
    return rows[META].join(cells_of(long, b, rows.index))


# --------------------------------------------------------------------------- paper rows

def load_paper(path: Path = PAPER_FILE) -> Dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def paper_rows(b: Benchmark, paper: Optional[Dict[str, Any]] = None) -> pd.DataFrame:
    """The rows of the published results of a benchmark: the printed parameter count goes in
    the column it matches (``params_include_head``; unknown: with the head, marked)."""
    paper = paper if paper is not None else load_paper()
    ps = pd.DataFrame(paper.get(b.name) or [], columns=["method", "backbone", "cite", "source", "params_m",
                                                        "params_include_head", "acc"])
    no_head = ps.params_include_head.eq(False)
    rows = ps.assign(kind="paper", label=list(map(method_label, ps.method, ps.backbone)), variant="",
                     protocol=paper.get("protocol", PAPER_PROTOCOL), experiment=ps.cite.fillna(ps.source), seeds="",
                     params_head=ps.params_m.mask(no_head), params_no_head=ps.params_m.where(no_head), partial=False,
                     head_known=ps.params_include_head.notna())[META]
    long = pd.DataFrame([(i, t, "paper", float(v)) for i, acc in enumerate(ps.acc) for t, v in acc.items()],
                        columns=["row", "task", "seed", "value"])
    return rows.join(cells_of(long, b, rows.index))


def diff_row(ours: pd.Series, paper: pd.Series) -> pd.Series:
    """ours − paper, cell by cell, without a std; the counts stay ours (an incomplete mean's too)."""
    row, c = ours.copy(), ours.index[len(META):]
    row[["kind", "protocol", "experiment", "params_head", "params_no_head", "partial"]] = [
        "diff", f"Δ {ours.protocol} − paper", f"{ours.experiment or '—'} − {paper.experiment}",
        math.nan, math.nan, False]
    row[c] = (ours[c] - paper[c]).mask(c.str.endswith("_std")).where(~c.str.endswith("_n"), ours[c])
    return row


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
    notes = list(notes or [])
    long = group_rows([r for r in records if r.dataset == dataset], views, notes)
    for _, g in long[~long.task.isin(b.tasks)].groupby("row"):
        notes.append(f"ignored tasks not in {b.title}: {', '.join(sorted(set(g.task)))} ({g.label.iloc[0]}, "
                     f"{VIEWS[g.view.iloc[0]].label})")
    rows = our_rows(long, b)
    for _, r in rows[rows[list(b.spans)[len(b.tasks):]].isna().any(axis=1)].iterrows():
        notes.append(f"incomplete: {r.label} {r.protocol} {r.experiment}".rstrip()
                     + f": missing {', '.join(t for t in b.tasks if r[t + '_n'] == 0)}")
    if paper:
        pub = paper_rows(b, paper_data).drop_duplicates(["method", "backbone"])  # one per method and backbone
        out = []
        for m, bb in sorted(set(zip(rows.method, rows.backbone)) | set(zip(pub.method, pub.backbone)),
                            key=lambda k: (method_rank(k[0]), k[1] != DEFAULT_BACKBONE, k[1])):
            p = [r for _, r in pub[(pub.method == m) & (pub.backbone == bb)].iterrows()]
            out += p
            for _, r in rows[(rows.method == m) & (rows.backbone == bb)].iterrows():
                out += [r, diff_row(r, p[0])] if p and not r.protocol.startswith("tune") else [r]
        rows = pd.DataFrame(out, columns=rows.columns).infer_objects()
    return Table(b, rows.reset_index(drop=True), notes)


# --------------------------------------------------------------------------- render

HEADER = ["method", "protocol", "experiment"]
PARAMS_HEADER = ["params M (+head)", "params M (no head)"]
# per format: a std, the seeds of a cell with fewer than the row's others, a paper row's label
MARKS = {"md": (" ± {:.2f}", " (n={})", "*{}*"),
         "tex": (r"{{\scriptsize$\pm${:.2f}}}", r" {{\scriptsize(n={})}}", r"\textit{{{}}}")}


def _cell_text(row: pd.Series, key: str, span: List[str], most: int, marks: Sequence[str]) -> str:
    m, sd, n, task = row[key], row[f"{key}_std"], row[f"{key}_n"], span == [key]
    if pd.isna(m):
        return "" if task else f"incomplete ({int(n)}/{len(span)})"
    s = f"{m:{'+' if row.kind == 'diff' else ''}.{1 if task and row.kind == 'paper' else 2}f}"
    s = ("0.00" if s in ("+0.00", "-0.00") else s) + (marks[0].format(sd) if pd.notna(sd) else "")
    return s + (marks[1].format(int(n)) if task and row.kind == "ours" and n < most else "")


def _params_text(row: pd.Series, head: bool) -> str:
    v = row.params_head if head else row.params_no_head
    if pd.isna(v):
        return ""
    if row.kind == "paper":  # the printed count
        return f"{v:.2f}" + ("?" if head and not row.head_known else "")
    return f"{v:.3f}" + ("†" if row.partial else "")


def _texts(t: Table, fmt: str) -> List[List[str]]:
    """Each row's texts in format ``fmt`` (md | tex)."""
    esc, marks = tex_escape if fmt == "tex" else (lambda x: x.replace("|", "\\|").replace("*", "\\*")), MARKS[fmt]
    out, prev = [], None
    for _, row in t.rows.iterrows():
        most = max([row[f"{k}_n"] for k in t.benchmark.tasks], default=0)
        lead = [esc(row.label), esc(row.protocol), esc(row.experiment)]
        lead[0] = marks[2].format(lead[0]) if row.kind == "paper" else lead[0]
        if fmt == "tex" and prev not in (None, (row.method, row.backbone)):  # a rule between method groups
            lead[0] = "\\midrule\n" + lead[0]
        prev = (row.method, row.backbone)
        out.append(lead + [_cell_text(row, k, s, most, marks) for k, s in t.benchmark.spans.items()]
                   + [esc(_params_text(row, True)), esc(_params_text(row, False)), esc(_seed_count(row.seeds))])
    return out


def _seed_count(seeds: str) -> str:
    """The seeds column of the markdown and LaTeX tables: how many seeds (the CSV keeps their ids)."""
    return str(len(seeds.split(","))) if seeds else ""


def _title(t: Table) -> str:
    """The benchmark and the backbones its rows ran on: the benchmark's own (ViT-B/16, the papers'
    and its AugReg variant, marked *) or the timm names of any other."""
    ours = t.rows.backbone[t.rows.kind == "ours"] if len(t.rows) else []
    names = dict.fromkeys(t.benchmark.backbone if bb in BACKBONE_MARKS else bb for bb in ours)
    return f"{t.benchmark.title} — {', '.join(names) or t.benchmark.backbone}, top-1 accuracy (%)"


# tabulate's "pipe" format without padding: text columns left-aligned, numbers right-aligned
PIPE = TableFormat(None, lambda widths, _: "|" + "|".join([":--"] * len(HEADER) + ["--:"] * (len(widths) - len(HEADER)))
                   + "|", None, None, DataRow("|", "|", "|"), DataRow("|", "|", "|"), 1, None)


def to_markdown(t: Table) -> str:
    head = HEADER + t.benchmark.titles + PARAMS_HEADER + ["seeds"]
    md = pd.DataFrame(_texts(t, "md"), columns=head).to_markdown(
        index=False, tablefmt=PIPE, stralign=None, numalign=None, disable_numparse=True)
    notes = ["", "Notes:", *[f"- {x}" for x in t.notes]] if t.notes else []
    return "\n".join([f"## {_title(t)}", "", md, "", *[f"- {x}" for x in LEGEND], *notes]) + "\n"


def to_csv(t: Table) -> str:
    r, b = t.rows.copy(), t.benchmark
    for k in b.spans:  # a difference counts its seeds or tasks only where it has a value
        r[f"{k}_n"] = r[f"{k}_n"].where(r[k].notna() | (r.kind != "diff"), 0).astype(int)
    for k, col in (("params_head", "params_m_with_head"), ("params_no_head", "params_m_no_head")):
        r[col] = r[k].map(lambda x: "" if pd.isna(x) else f"{x:.6f}")
    for x, col in ((r.partial, "params_partial"), (r[list(b.spans)].notna().all(axis=1), "complete")):
        r[col] = x.astype(bool).astype(str).str.lower()
    r = r.rename(columns={f"{k}_n": f"{k}_n_tasks" for k in list(b.spans)[len(b.tasks):]})
    return r.drop(columns=["label", "params_head", "params_no_head", "partial", "head_known"]).to_csv(
        index=False, float_format="%.4f", lineterminator="\n")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "†": r"$^\dagger$", "Δ": r"$\Delta$", "−": r"$-$", "→": r"$\to$", "—": "--",
        "§": r"\S{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    head = [tex_escape(h) for h in HEADER] + [rf"\rotatebox{{90}}{{{tex_escape(h)}}}"
                                              for h in t.benchmark.titles + PARAMS_HEADER] + ["seeds"]
    body = pd.DataFrame(_texts(t, "tex"), columns=head).to_latex(
        index=False, escape=False, column_format="l" * len(HEADER) + "r" * (len(head) - len(HEADER)))
    return "\n".join([f"% {_title(t)}", "% generated by scripts/make_table.py; needs \\usepackage{booktabs,graphicx}",
                      body.rstrip("\n"), *[f"% {tex_escape(x)}" for x in LEGEND + t.notes]]) + "\n"


RENDERERS = {"md": to_markdown, "csv": to_csv, "tex": to_latex}


def safe_stems(names: Iterable[str]) -> Dict[str, str]:
    """Dataset name -> a file-name stem: anything but letters, digits, '.', '_' and '-' becomes
    '_' (``vtab/caltech101`` -> ``vtab_caltech101``); names that would share a stem get a hash."""
    stems = {n: re.sub(r"[^A-Za-z0-9._-]+", "_", n).strip("._") or "dataset" for n in names}
    return {n: s if list(stems.values()).count(s) == 1 else f"{s}_{hashlib.sha1(n.encode()).hexdigest()[:8]}"
            for n, s in stems.items()}


def write_table(t: Table, out_dir: Path, formats: Sequence[str] = ("md", "csv", "tex"),
                stem: Optional[str] = None) -> List[Path]:
    """Writes <out_dir>/<stem>.<format>; the stem defaults to the benchmark's name made safe."""
    stem = stem or safe_stems([t.benchmark.name])[t.benchmark.name]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for f in formats:
        (Path(out_dir) / f"{stem}.{f}").write_text(RENDERERS[f](t))
    return [Path(out_dir) / f"{stem}.{f}" for f in formats]
