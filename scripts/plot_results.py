#!/usr/bin/env python
"""Figures from every results.json under the given directories.

    python scripts/plot_results.py outputs/ --out reports/ --paper

Writes, per benchmark (vtab, fgvc), <out>/<dataset>_acc_vs_params.{png,pdf,json}: mean accuracy
(complete rows only) vs trainable params incl. head (log x), ours (circles) beside the papers'
(triangles, with --paper), one Pareto front per protocol. For HTA runs with diagnostics:
<out>/householder_rank_<dataset>_<protocol>[_<experiment>].{png,pdf,json}: the per-layer
effective rank, mean over tasks. The .json files hold exactly the plotted numbers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft_vit.report.collect import load_records  # noqa: E402
from peft_vit.report.plots import householder_groups, plot_accuracy_vs_params, plot_householder_ranks  # noqa: E402
from peft_vit.report.tables import build_table, safe_stems  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--paper", action="store_true", help="plot the papers' points too")
    ap.add_argument("--views", default="last,max", help="our accuracies to plot: last, max (default both)")
    ap.add_argument("--rank-protocol", default="final", help="protocol of the HTA runs for the rank plot "
                                                             "(final | tune | all)")
    a = ap.parse_args(argv)
    col = load_records(a.dirs)
    out = Path(a.out)
    views = [v for v in a.views.split(",") if v]
    for msg in col.issues:
        print(f"warning: {msg} (skipped)", file=sys.stderr)
    stems = safe_stems(sorted({r.dataset for r in col.records}))
    for ds, stem in stems.items():
        table = build_table(col.records, ds, views, paper=a.paper)
        data = plot_accuracy_vs_params(table, out / f"{stem}_acc_vs_params")
        print(out / f"{stem}_acc_vs_params.png", f"({len(data['points'])} points)")
        for s in data["skipped"]:
            print(f"note [{ds}]: not plotted: {s}", file=sys.stderr)
    proto = None if a.rank_protocol == "all" else a.rank_protocol
    groups = householder_groups(col.records, proto)
    for name, stem in safe_stems(groups).items():
        data = plot_householder_ranks(groups[name], out / f"householder_rank_{stem}", title=name)
        print(out / f"householder_rank_{stem}.png", f"({len(data['tasks'])} tasks, {data['n_records']} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
