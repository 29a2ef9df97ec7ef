"""Tables, plots and hyper-parameter selection from many ``results.json`` run records.

    from peft_vit.report import load_records, build_table, to_markdown
    col = load_records(["outputs/"])
    print(to_markdown(build_table(col.records, "vtab", paper=True)))

Command-line front ends: ``scripts/make_table.py``, ``scripts/plot_results.py``,
``scripts/select_best.py``.
"""
from .collect import (VIEWS, Collection, Record, SelectionError, Selection, group_rows, load_records,
                      select_best)
from .tables import (Benchmark, Table, build_table, load_paper, to_csv, to_latex, to_markdown, vtab_tasks,
                     write_table)

__all__ = [
    "VIEWS", "Collection", "Record", "Selection", "SelectionError", "group_rows", "load_records", "select_best",
    "Benchmark", "Table", "build_table", "load_paper", "to_csv", "to_latex", "to_markdown", "vtab_tasks",
    "write_table",
]
