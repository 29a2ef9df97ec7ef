"""Figures from run records (matplotlib, Agg backend).

Every plot function returns the data it drew (a JSON-able dict) and writes it beside the
figure as ``<stem>.json``, so tests and readers can check the plotted numbers without pixels.

* :func:`plot_accuracy_vs_params` — mean accuracy of complete rows vs trainable parameters
  (incl. head, log x), ours (circles) beside the papers' (triangles), one Pareto front per
  protocol (protocols never share a front).
* :func:`plot_householder_ranks` — HTA's per-layer effective rank of the H-term
  (``results.json["householder"]``; the 90 % energy rank), mean over tasks (each task: mean
  over seeds), as a layer × matrix heatmap and as lines. :func:`plot_run` draws it for one run,
  beside its record (``train.py`` calls it; the loop draws nothing).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd

from ..record import RunRecord
from .collect import BACKBONE_MARKS, Record
from .tables import PAPER_PROTOCOL, Table


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path, data: Dict[str, Any], formats: Sequence[str] = ("png", "pdf")) -> List[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        p = stem.with_name(stem.name + f".{ext}")
        fig.savefig(p, dpi=150, bbox_inches="tight", **({"metadata": {"CreationDate": None}} if ext == "pdf" else {}))
        paths.append(p)
    j = stem.with_name(stem.name + ".json")
    j.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    paths.append(j)
    return paths


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point dominates (fewer or equal params and higher or
    equal accuracy, one of them strictly), ordered by params."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# --------------------------------------------------------------------------- accuracy vs params

def accuracy_vs_params_data(table: Table, protocols: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Points (complete rows only) and per-protocol Pareto fronts of a table."""
    b = table.benchmark
    protocols = set(protocols) if protocols is not None else None
    points, skipped = [], []
    for (_, row), mean in zip(table.rows.iterrows(), table.rows["mean"]):
        if row.kind == "diff" or (protocols is not None and row.protocol not in protocols):
            continue
        label = (row.label + (f" ({row.experiment})" if row.experiment else "")) if row.kind == "ours" \
            else f"{row.label} [{row.experiment}]"
        if row.variant and row.kind == "ours" and row.variant not in label:
            label += f" ({row.variant})"
        if pd.isna(mean):
            skipped.append(f"{label} — {row.protocol}: incomplete")
            continue
        params, note = row.params_head, None
        if pd.isna(params) and pd.notna(row.params_no_head):
            if b.head_m is None:
                skipped.append(f"{label} — {row.protocol}: no params with head")
                continue
            params = row.params_no_head + b.head_m
            note = f"printed {row.params_no_head:.2f}M without head + mean head {b.head_m:.3f}M"
        elif row.kind == "paper" and not row.head_known:
            note = "printed count; unknown whether it includes the head"
        if pd.isna(params) or params <= 0:
            skipped.append(f"{label} — {row.protocol}: no params")
            continue
        points.append({"label": label, "method": row.method, "source": row.kind, "protocol": row.protocol,
                       "backbone": row.backbone, "front": _front_key(row.protocol, row.backbone),
                       "params_m": round(float(params), 6), "acc": round(float(mean), 6),
                       **({"params_note": note} if note else {})})
    fronts = {}
    for key in dict.fromkeys(p["front"] for p in points):
        idx = [i for i, p in enumerate(points) if p["front"] == key]
        front = pareto_front([(points[i]["params_m"], points[i]["acc"]) for i in idx])
        fronts[key] = [points[idx[j]]["label"] for j in front]
    return {"benchmark": b.name, "x": "trainable params incl. head (M, mean over tasks)",
            "y": f"{b.mean_title} accuracy (%)", "points": points, "pareto_fronts": fronts, "skipped": skipped}


def _front_key(protocol: str, backbone: str) -> str:
    """One Pareto front per protocol and backbone: neither protocols nor pre-trainings share one."""
    mark = BACKBONE_MARKS.get(backbone)
    return protocol + ("" if mark == "" else f" [{'*' if mark == '*' else backbone}]")


_COLORS = {"final/last-epoch": "tab:blue", "final/max-over-epochs (selects on test)": "tab:orange",
           "tune/val": "tab:green", PAPER_PROTOCOL: "tab:gray"}


def plot_accuracy_vs_params(table: Table, stem: Path, protocols: Optional[Iterable[str]] = None,
                            annotate: bool = True) -> Dict[str, Any]:
    """Mean accuracy vs trainable params (log x). Writes <stem>.png, .pdf and .json; returns the
    plotted data. ``protocols`` restricts the rows (default: all but tune/val)."""
    if protocols is None:
        protocols = [p for p in table.rows.protocol.unique() if not p.startswith(("tune", "Δ"))]
    data = accuracy_vs_params_data(table, protocols)
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key in dict.fromkeys(p["front"] for p in data["points"]):
        pts = [p for p in data["points"] if p["front"] == key]
        star = key != pts[0]["protocol"]  # another backbone: hollow markers, dotted front
        color = _COLORS.get(pts[0]["protocol"], None)
        for src, marker in (("ours", "o"), ("paper", "^")):
            sel = [p for p in pts if p["source"] == src]
            if sel:
                ax.scatter([p["params_m"] for p in sel], [p["acc"] for p in sel], marker=marker, s=40,
                           color=color, label=key if src == "paper" else f"ours: {key}", zorder=3,
                           **({"facecolors": "none", "edgecolors": color} if star else {}))
        front = [next(p for p in pts if p["label"] == lab) for lab in data["pareto_fronts"].get(key, [])]
        if len(front) > 1:
            ax.step([p["params_m"] for p in front], [p["acc"] for p in front], where="post", color=color,
                    alpha=0.6, lw=1.2, ls=":" if star else ("--" if front[0]["source"] == "paper" else "-"),
                    zorder=2)
        if annotate:
            for p in pts:
                ax.annotate(p["label"], (p["params_m"], p["acc"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(data["x"])
    ax.set_ylabel(data["y"])
    ax.set_title(f"{table.benchmark.title}: accuracy vs trainable parameters "
                 "(lines: Pareto front per protocol and backbone)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if data["points"]:
        ax.legend(fontsize=7, loc="lower right")
    _save(fig, stem, data)
    plt.close(fig)
    return data


# --------------------------------------------------------------------------- householder ranks

MATRIX_ORDER = ["q", "k", "v", "qkv", "o", "fc1", "fc2"]  # a block's order: attention, then MLP


def householder_entries(diag: Any) -> List[Tuple[int, str, float]]:
    """(layer, matrix, effective_rank) from a record's ``householder`` diagnostics. Accepts the
    method's own ``{"per_matrix": [...]}``, ``{"layers": [...]}``, a bare list of rows, or
    ``{"<module name>": {"effective_rank": r}}`` / ``{"<layer>": {"<matrix>": r}}`` mappings."""
    rows: List[Tuple[int, str, float]] = []
    if isinstance(diag, dict):
        for key in ("per_matrix", "layers", "rows"):
            if isinstance(diag.get(key), list):
                return householder_entries(diag[key])
        for k, v in diag.items():
            m = re.search(r"(\d+)", str(k))
            if m is None:
                continue
            layer = int(m.group(1))
            if isinstance(v, dict) and "effective_rank" in v:
                mat = str(v.get("matrix") or re.sub(r".*[._]", "", str(k)))
                rows.append((layer, mat, float(v["effective_rank"])))
            elif isinstance(v, dict):
                rows += [(layer, str(mk), float(mv)) for mk, mv in v.items() if isinstance(mv, (int, float))]
        return rows
    if isinstance(diag, list):
        for r in diag:
            if isinstance(r, dict) and "effective_rank" in r and "layer" in r:
                rows.append((int(r["layer"]), str(r.get("matrix", "?")), float(r["effective_rank"])))
    return rows


def rank_definition(diag: Any) -> str:
    """What a record's ``effective_rank`` counts: the method says so (``effective_rank_is``:
    the 90 % energy rank); older records cut at ``rank_threshold`` · max|d|."""
    if isinstance(diag, dict) and isinstance(diag.get("effective_rank_is"), str):
        return diag["effective_rank_is"]
    if isinstance(diag, dict) and isinstance(diag.get("rank_threshold"), (int, float)):
        return f"rank_above_{diag['rank_threshold'] * 100:g}pct_max: #|d_i| > {diag['rank_threshold']:g}·max|d|"
    return "effective_rank (undefined by the record)"


def householder_groups(records: Sequence[Record], protocol: Optional[str] = "final") -> Dict[str, List[Record]]:
    """Householder records with diagnostics, grouped by (dataset, backbone, experiment, protocol)
    and by what their rank counts (:func:`rank_definition`; named in the group when it varies):
    ranks of different definitions are never averaged together."""
    groups: Dict[Tuple[str, str], List[Record]] = {}
    for r in records:
        if r.method != "householder" or (protocol and r.protocol != protocol):
            continue
        if not householder_entries(r.diagnostics):
            continue
        mark = BACKBONE_MARKS.get(r.backbone)
        name = "_".join(x for x in (r.dataset, r.protocol, r.experiment or "",
                                    "augreg" if mark == "*" else (r.backbone if mark is None else "")) if x)
        groups.setdefault((name, rank_definition(r.diagnostics)), []).append(r)
    names = [name for name, _ in groups]
    return dict(sorted((name if names.count(name) == 1 else f"{name}_{defn.split(':')[0]}", recs)
                       for (name, defn), recs in groups.items()))


def householder_rank_data(records: Sequence[RunRecord]) -> Dict[str, Any]:
    """Mean effective rank per (layer, matrix) over tasks (each task: mean over its seeds)."""
    df = pd.DataFrame([(r.task, *entry) for r in records for entry in householder_entries(r.diagnostics)],
                      columns=["task", "layer", "matrix", "rank"])
    per_task = df.groupby(["task", "layer", "matrix"])["rank"].mean()
    grid = per_task.groupby(["layer", "matrix"]).agg(["mean", "count"]).unstack()
    mats = sorted(df["matrix"].unique(), key=lambda m: (MATRIX_ORDER.index(m) if m in MATRIX_ORDER else 99, m))
    mean = grid["mean"].reindex(columns=mats) if len(df) else pd.DataFrame()
    count = grid["count"].reindex(columns=mats).fillna(0).astype(int) if len(df) else pd.DataFrame()
    full = {float(row["full_rank"]) for r in records for row in r.diagnostics.get("per_matrix")
            or r.diagnostics.get("layers") or [] if isinstance(row, dict) and "full_rank" in row}
    return {"tasks": sorted(df["task"].unique()), "n_records": len(records), "layers": mean.index.tolist(),
            "matrices": mats, "effective_rank_is": sorted({rank_definition(r.diagnostics) for r in records}),
            "mean_effective_rank": [[None if pd.isna(v) else round(v, 6) for v in row] for row in mean.values.tolist()],
            "n_tasks": count.values.tolist(), "full_rank": sorted(full) or None,
            "aggregation": "per task: mean over seeds; then mean over tasks"}


def plot_householder_ranks(records: Sequence[RunRecord], stem: Path, title: str = "",
                           formats: Sequence[str] = ("png", "pdf")) -> Dict[str, Any]:
    """Layer × matrix heatmap and per-matrix lines of the mean effective rank of HTA's H-term."""
    data = householder_rank_data(records)
    plt = _mpl()
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in data["mean_effective_rank"]], dtype=float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    if grid.size:
        im = a1.imshow(grid, aspect="auto", cmap="viridis")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    a1.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color="w", fontsize=7)
        fig.colorbar(im, ax=a1)
        for j, m in enumerate(data["matrices"]):
            a2.plot(data["layers"], grid[:, j], marker="o", ms=3, label=m)
        a2.legend(fontsize=7)
    a1.set_xticks(range(len(data["matrices"])), data["matrices"])
    a1.set_yticks(range(len(data["layers"])), data["layers"])
    a1.set_xlabel("matrix")
    a1.set_ylabel("layer")
    a2.set_xlabel("layer")
    a2.set_ylabel("effective rank of H(v_l) diag(d) H(v_r)\n" + "\n".join(data["effective_rank_is"]), fontsize=7)
    a2.grid(True, alpha=0.3)
    over = f", mean over {len(data['tasks'])} tasks" if data["n_records"] > 1 else ""
    fig.suptitle(f"HTA per-layer effective rank{over}" + (f" — {title}" if title else ""), fontsize=9)
    fig.tight_layout()
    data["title"] = title
    _save(fig, stem, data, formats)
    plt.close(fig)
    return data


def plot_run(record: RunRecord, out_dir: Path) -> List[Path]:
    """One run's figures of its method's diagnostics, beside its results.json (``train.py``
    calls this after the run; the loop draws nothing): HTA's ``householder_rank.png`` (+ ``.json``, its data)."""
    if record.method != "householder" or not householder_entries(record.diagnostics):
        return []
    stem = Path(out_dir) / "householder_rank"
    plot_householder_ranks([record], stem, title=f"{record.dataset}/{record.task}, seed {record.seed}",
                           formats=("png",))
    return [stem.with_suffix(".png"), stem.with_suffix(".json")]
