#!/usr/bin/env python
"""VTAB-1k / FGVC result tables from every results.json under the given directories.

    python scripts/make_table.py outputs/ --out reports/ --format md,csv,tex --paper

Writes <out>/vtab.{md,csv,tex} (and fgvc.*, and one per other dataset found). Rows are
(method, protocol[, experiment]); a final-protocol run gives two rows, its last-epoch test
accuracy (`final/last-epoch`) and its max over epochs (`final/max-over-epochs (selects on
test)`, the papers' protocol); tune runs give `tune/val`. `--paper` adds the published rows
(peft_vit/report/paper_results.yaml) and the difference ours − paper. Duplicate runs, rows
split by differing configs and incomplete rows are listed under the table and on stderr.

Every record is validated (method, dataset, task: non-empty strings; protocol: tune or final;
seed: an integer; the protocol's accuracy, test_acc or val_acc, a finite number; optional keys such as
config, experiment, best_acc_over_epochs and trainable_params of the right type). A malformed or
unreadable results.json is skipped with a warning that names its path and what is wrong, and is
listed under the tables; `--strict` refuses instead (exit 2, nothing written). Output file names
are the dataset names made safe: a dataset `vtab/caltech101` is written to vtab_caltech101.*.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft_vit.report.collect import VIEWS, load_records  # noqa: E402
from peft_vit.report.tables import RENDERERS, build_table, safe_stems, to_markdown, write_table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="run or sweep directories (searched recursively for results.json)")
    ap.add_argument("--out", default="reports", help="output directory (default: reports/)")
    ap.add_argument("--format", default="md,csv,tex", help="comma list of md, csv, tex")
    ap.add_argument("--paper", action="store_true", help="add the papers' rows and ours − paper")
    ap.add_argument("--views", default="last,max,val",
                    help="which accuracies to tabulate: last (final, last epoch), max (final, max over epochs, "
                         "selects on test), val (tune, last epoch); default all")
    ap.add_argument("--datasets", default=None, help="comma list (default: every dataset found)")
    ap.add_argument("--print", dest="show", action="store_true", help="also print the Markdown tables")
    ap.add_argument("--strict", action="store_true",
                    help="refuse (exit 2) when a results.json is malformed or unreadable, instead of skipping it")
    a = ap.parse_args(argv)

    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in RENDERERS]
    views = [v.strip() for v in a.views.split(",") if v.strip()]
    if bad or any(v not in VIEWS for v in views):
        ap.error(f"unknown format or view: {bad or views}")
    col = load_records(a.dirs)
    for msg in col.issues:
        print(f"{'error' if a.strict else 'warning'}: {msg}{'' if a.strict else ' (skipped)'}", file=sys.stderr)
    if col.issues and a.strict:
        print(f"refusing: {len(col.issues)} malformed record(s) (--strict); fix or remove them, or drop --strict "
              "to skip them", file=sys.stderr)
        return 2
    if not col.records:
        print(f"no valid results.json under {' '.join(a.dirs)}", file=sys.stderr)
        return 1
    datasets = a.datasets.split(",") if a.datasets else sorted({r.dataset for r in col.records})
    stems = safe_stems(datasets)
    for ds in datasets:
        table = build_table(col.records, ds, views, paper=a.paper, notes=[f"{m} (skipped)" for m in col.issues])
        if not (table.rows.kind == "ours").any():
            print(f"{ds}: no records for the views {','.join(views)}", file=sys.stderr)
            continue
        for p in write_table(table, Path(a.out), formats, stem=stems[ds]):
            print(p)
        for n in table.notes:
            print(f"note [{ds}]: {n}", file=sys.stderr)
        if a.show:
            print(to_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
