#!/usr/bin/env python
"""Pick the best hyper-parameters per (method, task) from tune-protocol sweeps, and write the
jobs that re-train them with protocol=final on train800val200 with several seeds.

    python train.py -m experiment=vtab_honest method=lora dataset=vtab/dtd     # the grid, on val200
    python scripts/select_best.py outputs/sweeps/ --out selection/
    bash selection/final_commands.sh                                            # or run final_jobs.txt

Only `tune` records are read (train800 -> val200). A `final` record, a record evaluated on
test, or a metric that selects on test is refused (exit 2): selection never sees test.
`--ignore-final` skips such records instead of refusing.

Candidates are the settings of every config key that varies among a (method, task)'s tune
runs — normally optim.lr × optim.weight_decay (the grid of the preset's hydra.sweeper.params)
— scored by the metric averaged over seeds.
Ties (documented rule): the higher mean wins; then the smaller optim.lr; then the larger
optim.weight_decay; then the other varying values compared as strings.

Outputs (in --out):
  selection.yaml       per (method, task): the chosen values, score, and every candidate ranked
  final_jobs.txt       one job per line (one seed each): Hydra overrides for `python train.py`
  final_commands.sh    one `python train.py -m ... seed=0,1,2` per (method, task)
The overrides are the tuned runs' own (when results.json stores them; otherwise rebuilt from
experiment, method and dataset) minus the swept keys, plus the chosen values, protocol=final
and the seeds. Command-line values win over a preset's hydra.sweeper.params grid, so `-m`
runs only the seeds.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from peft_vit.report.collect import SelectionError, load_records, select_best  # noqa: E402


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def write_selection(sels, out: Path, seeds: Sequence[int], metric: str = "val_acc") -> None:
    """Prints the selections and writes selection.yaml, final_jobs.txt and final_commands.sh to ``out``
    (also called by scripts/reproduce.py)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'dataset':8} {'method':12} {'task':14} {'experiment':14} {metric:>16} {'seeds':>5} {'cands':>5}  chosen")
    doc, jobs, cmds = [], [], []
    for s in sels:
        b = s.best
        std = f" ± {b.std:.2f}" if b.std is not None else ""
        chosen = " ".join(f"{k}={_fmt(v)}" for k, v in b.values) or "(nothing varied)"
        print(f"{s.dataset:8} {s.method:12} {s.task:14} {s.experiment or '-':14} {b.mean:>9.2f}{std:7} "
              f"{len(b.seeds):>5} {len(s.candidates):>5}  {chosen}")
        if not s.overrides_exact:
            print(f"  note: {s.method}/{s.task}: results.json stores no overrides; rebuilt "
                  f"{' '.join(s.base_overrides)}", file=sys.stderr)
        doc.append({
            "dataset": s.dataset, "method": s.method, "task": s.task, "experiment": s.experiment,
            "backbone": s.backbone, "metric": s.metric, "selected_on": "val200 (protocol tune)",
            "chosen": {k: v for k, v in b.values}, "score_mean": round(b.mean, 4),
            "score_std": None if b.std is None else round(b.std, 4), "seeds": b.seeds,
            "final_overrides": s.final_overrides(seeds), "overrides_from_record": s.overrides_exact,
            "candidates": [{"values": {k: v for k, v in c.values}, "mean": round(c.mean, 4),
                            "std": None if c.std is None else round(c.std, 4), "seeds": c.seeds}
                           for c in s.candidates],
        })
        for seed in seeds:
            jobs.append(" ".join(shlex.quote(o) for o in s.final_overrides([seed])))
        cmds.append("python train.py -m " + " ".join(shlex.quote(o) for o in s.final_overrides(seeds)))

    import yaml

    (out / "selection.yaml").write_text(
        "# written by scripts/select_best.py; selected on val200 (protocol tune), never on test\n"
        + yaml.safe_dump(doc, sort_keys=False, width=120))
    (out / "final_jobs.txt").write_text("\n".join(jobs) + "\n")
    (out / "final_commands.sh").write_text("#!/usr/bin/env bash\n# protocol=final on train800val200 with the "
                                           "hyper-parameters selected on val200\nset -e\n" + "\n".join(cmds) + "\n")
    print(f"\n{out / 'selection.yaml'}\n{out / 'final_jobs.txt'} ({len(jobs)} jobs)\n{out / 'final_commands.sh'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="sweep directories (searched recursively for results.json)")
    ap.add_argument("--metric", default="val_acc",
                    help="val_acc (last-epoch val200 accuracy, default) or best_acc_over_epochs (max over "
                         "epochs on val200)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the final runs (default 0,1,2)")
    ap.add_argument("--out", default="selection", help="output directory (default: selection/)")
    ap.add_argument("--ignore-final", action="store_true", help="skip final/test records instead of refusing")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]

    col = load_records(a.dirs)
    for msg in col.issues:
        print(f"warning: {msg} (skipped)", file=sys.stderr)
    notes = []
    try:
        sels = select_best(col.records, a.metric, ignore_final=a.ignore_final, notes=notes)
    except SelectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if not sels:
        print("no tune-protocol records found", file=sys.stderr)
        return 1

    write_selection(sels, Path(a.out), seeds, a.metric)
    return 0


if __name__ == "__main__":
    sys.exit(main())
