#!/usr/bin/env python
"""The proxy benchmark: every registered method on every proxy task, with the shipped small
pretrained ViT (configs/experiment/proxy.yaml), offline, on a CPU.

    python scripts/proxy_benchmark.py                          # all methods x all tasks -> outputs/proxy/
    python scripts/proxy_benchmark.py --methods linear lora --tasks count digits
    python scripts/proxy_benchmark.py --tune                   # redo the learning-rate tuning first

Each run is ``python train.py experiment=proxy dataset=proxy/<task> method=<m>``, executed in
this process (no start-up cost per run) and writing the usual ``results.json`` under
``<out>/final/<method>/<task>/``; runs whose record exists are skipped (``--rerun`` redoes them)
unless the task's data was regenerated after it (a new generator version of that task).
Then it writes ``<out>/proxy_table.{md,csv}`` (methods x tasks, group means, the mean,
trainable parameters) and ``<out>/proxy_acc_vs_params.png``.

Learning rates: one per method, ``proxy_lr`` in configs/experiment/proxy.yaml, chosen by
``--tune``: protocol ``tune`` (fit train800, score val200) on TUNE_TASKS over each method's
grid in LR_GRID (extended upward by ×3, up to EXTEND times, while the best is the largest lr
tried); the best mean val accuracy wins. ``--tune`` rewrites that block and writes
the whole grid to weights/proxy_tuning.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

EXPERIMENT = REPO / "configs" / "experiment" / "proxy.yaml"
TUNING_FILE = REPO / "weights" / "proxy_tuning.json"
TUNE_TASKS = ("textures", "count")  # one natural, one structured task
# per-method grids: the head alone takes larger steps than the whole backbone
LR_GRID = {"linear": (3e-3, 1e-2, 3e-2), "full": (1.5e-4, 5e-4, 1.5e-3)}
PEFT_GRID = (1e-3, 3e-3, 1e-2)
EXTEND = 2  # a best lr at the top of a grid gets up to two more points above it (×3 each)
GROUPS = ("natural", "specialized", "structured")


def registered_methods() -> List[str]:
    from peft_vit.methods import METHODS

    order = {"linear": 0, "full": 1}
    return sorted(METHODS, key=lambda m: (order.get(m, 2), m))


def run_one(method: str, task: str, out_dir: Path, protocol: str = "final", overrides: Sequence[str] = (),
            rerun: bool = False) -> Dict:
    """``train.py experiment=proxy dataset=proxy/<task> method=<method> protocol=<protocol>
    <overrides>`` in this process; returns its record (read back when the run was done before)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from peft_vit.engine.loop import run
    from peft_vit.engine.rundir import record_config
    from peft_vit.fingerprint import config_diff, fingerprint, result_config
    from peft_vit.record import RESULTS, RunContext, RunRecord

    from peft_vit.data.proxy import get_task, write_task

    out_dir = Path(out_dir)
    args = ["experiment=proxy", f"dataset=proxy/{task}", f"method={method}", f"protocol={protocol}",
            "skip_done=false", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args, return_hydra_config=True)
    cfg.hydra.runtime.cwd = str(REPO)
    cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves
    with open_dict(cfg):
        del cfg["hydra"]
    # the task's folder, (re)written when its generator's version changed; a record older than
    # the folder was measured on other data and is redone
    stamp = write_task(get_task(task), cfg.dataset.root, int(cfg.dataset.seed)) / "proxy.json"
    result = out_dir / RESULTS
    if result.exists() and not rerun and result.stat().st_mtime_ns > stamp.stat().st_mtime_ns:
        old = RunRecord.read(result).to_dict()
        stored = record_config(old)
        if stored is not None and fingerprint(stored) == fingerprint(result_config(cfg)):
            return old  # the same run, done before; another config (e.g. a re-tuned lr) is redone
        print(f"[proxy] {result}: made by another configuration "
              f"({'; '.join(config_diff(stored or {}, result_config(cfg), limit=3))}); running again", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    from peft_vit.report.plots import plot_run

    record = run(cfg, RunContext(out_dir, "proxy", None, tuple(args)))
    plot_run(record, out_dir)  # the method's figures, as train.py draws them
    return record.to_dict()


def task_groups() -> Dict[str, str]:
    from peft_vit.data.proxy import TASKS

    return {name: t.group for name, t in TASKS.items()}


# ------------------------------------------------------------------------------ tuning

def current_lrs() -> Dict[str, float]:
    from omegaconf import OmegaConf

    return {k: float(v) for k, v in OmegaConf.load(EXPERIMENT).proxy_lr.items()}


def check_tuned(methods: Sequence[str]) -> None:
    """Every method must have a tuned learning rate in configs/experiment/proxy.yaml; a new one is
    refused with the command that tunes it (nothing falls back to an untuned default)."""
    missing = [m for m in methods if m not in current_lrs()]
    if missing:
        raise SystemExit(f"no tuned proxy learning rate for {', '.join(missing)} (proxy_lr in "
                         f"{os.path.relpath(EXPERIMENT, REPO)}); tune it first: python scripts/proxy_benchmark.py --tune --methods "
                         f"{' '.join(missing)}   (--tune-only to stop after tuning; other methods' entries are kept)")


def write_lrs(lrs: Dict[str, float]) -> None:
    """Rewrite the ``proxy_lr`` block of configs/experiment/proxy.yaml (between its markers)."""
    text = EXPERIMENT.read_text()
    block = "".join(f"  {m}: {lr:.1e}\n" for m, lr in sorted(lrs.items()))
    new, n = re.subn(r"(# BEGIN proxy_lr[^\n]*\n).*?(  # END proxy_lr)", lambda mt: mt.group(1) + block + mt.group(2),
                     text, flags=re.S)
    if n != 1:
        raise ValueError(f"{EXPERIMENT}: no '# BEGIN proxy_lr' ... '# END proxy_lr' block to rewrite")
    EXPERIMENT.write_text(new)


def tune(methods: Sequence[str], out: Path, epochs: Optional[int], rerun: bool) -> Dict[str, float]:
    grid = {m: list(LR_GRID.get(m, PEFT_GRID)) for m in methods}
    total, k, t0 = sum(len(g) for g in grid.values()) * len(TUNE_TASKS), 0, time.time()
    table = {}
    for m in methods:
        table[m] = {}
        while grid[m]:
            lr = grid[m].pop(0)
            accs = {}
            for task in TUNE_TASKS:
                k += 1
                ov = [f"optim.lr={lr}"] + ([f"trainer.epochs={epochs}"] if epochs else [])
                rec = run_one(m, task, out / "tune" / m / task / f"lr{lr:g}", "tune", ov, rerun)
                accs[task] = rec["val_acc"]
                print(f"[tune {k}/{total}] {m:12s} lr {lr:.1e} {task:12s} val {rec['val_acc']:6.2f}%  "
                      f"({time.time() - t0:.0f}s)", flush=True)
            table[m][f"{lr:g}"] = {**accs, "mean": sum(accs.values()) / len(accs)}
            if not grid[m]:  # the best at the grid's largest lr: extend it by ×3 (at most EXTEND times)
                tried = sorted(float(x) for x in table[m])
                top = max(table[m], key=lambda x: table[m][x]["mean"])
                if float(top) == tried[-1] and len(tried) < len(LR_GRID.get(m, PEFT_GRID)) + EXTEND:
                    grid[m].append(float(f"{3 * tried[-1]:.3g}"))
                    total += len(TUNE_TASKS)
    best = {m: float(max(rows, key=lambda lr: rows[lr]["mean"])) for m, rows in table.items()}
    lrs = {**current_lrs(), **best}
    write_lrs(lrs)
    # merged into the file: methods tuned by another invocation (--methods) keep their entries
    record = json.loads(TUNING_FILE.read_text()) if TUNING_FILE.is_file() else {"chosen": {}, "val_acc": {}}
    record.update({"protocol": "tune (fit train800, score val200; last epoch)", "tasks": list(TUNE_TASKS),
                   "epochs": epochs or "the experiment's", "selection": "best mean val accuracy over the tasks",
                   "command": "python scripts/proxy_benchmark.py --tune [--methods ...]"})
    record["chosen"].update(best)
    record["val_acc"].update(table)
    TUNING_FILE.parent.mkdir(parents=True, exist_ok=True)
    TUNING_FILE.write_text(json.dumps(record, indent=2) + "\n")
    print(f"tuned learning rates -> {os.path.relpath(EXPERIMENT, REPO)} proxy_lr: {best}")
    return best


# ------------------------------------------------------------------------------ table and plot

# where benchmark() writes each protocol's runs (the tuning grid has its own "tune" folder)
RUN_DIRS = {"final": "final", "tune": "val"}


def collect(out: Path, protocol: str = "final"):
    """One row per (method, task) from ``<out>/final/**/results.json`` (test accuracy), or
    ``<out>/val/**`` (protocol tune: val accuracy)."""
    import pandas as pd

    from peft_vit.record import RESULTS, RunRecord

    rows = []
    for f in sorted((out / RUN_DIRS[protocol]).rglob(RESULTS)):
        r = RunRecord.read(f).to_dict()
        if r.get("dataset") != "proxy" or r.get("protocol") != protocol:
            continue
        acc = r["test_acc"] if protocol == "final" else r["val_acc"]
        rows.append({"method": r["method"], "task": r["task"], "acc": acc, "seed": r["seed"],
                     "params": r["trainable_params"], "params_no_head": r["trainable_params_no_head"],
                     "total": r["total_params"], "wall_s": r["wall_time_s"]})
    return pd.DataFrame(rows)


def make_table(df, methods: Sequence[str], tasks: Sequence[str]):
    """methods x tasks (test accuracy, mean over seeds), then the group means, the mean over
    tasks and the trainable parameters without the head (thousands; mean over tasks)."""
    groups = task_groups()
    tasks = [t for g in GROUPS for t in tasks if groups[t] == g]
    acc = df.pivot_table(index="method", columns="task", values="acc", aggfunc="mean")
    acc = acc.reindex(index=[m for m in methods if m in acc.index], columns=tasks)
    table = acc.copy()
    for g in GROUPS:
        cols = [t for t in tasks if groups[t] == g]
        if cols:  # a mean only over complete rows: NaN propagates
            table[f"{g} mean"] = acc[cols].mean(axis=1, skipna=False)
    table["mean"] = acc.mean(axis=1, skipna=False)
    per = df.groupby("method")
    table["params (K, no head)"] = per["params_no_head"].mean().reindex(table.index) / 1e3
    table["% of backbone"] = 100 * per["params_no_head"].mean() / (per["total"].mean() - per["params"].mean()
                                                                    + per["params_no_head"].mean())
    table["run time (s)"] = per["wall_s"].sum().reindex(table.index)
    return table


def to_markdown(table) -> str:
    cols = list(table.columns)
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append("–" if v != v else (f"{v:.0f}" if c == "run time (s)" else
                                               f"{v:.1f}" if c.startswith("params") else f"{v:.2f}" if c.startswith("%")
                                               else f"**{v:.1f}**" if c.endswith("mean") else f"{v:.1f}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for col, marker in (("mean", "o"), ("structured mean", "s")):
        if col not in table:
            continue
        x = table["params (K, no head)"].clip(lower=0.05)  # linear has none: drawn at the axis' left
        ax.scatter(x, table[col], marker=marker, label=col)
        if col == "mean":
            for m, xv, yv in zip(table.index, x, table[col]):
                ax.annotate(m, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters without head (thousands, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Proxy benchmark: accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main

def benchmark(methods: Sequence[str], tasks: Sequence[str], out: Path, overrides: Sequence[str] = (),
              rerun: bool = False, seed: int = 0, protocol: str = "final") -> List[Dict]:
    """Every method on every task under ``<out>/final`` (protocol final: test accuracy) or
    ``<out>/val`` (protocol tune: fit train800, val accuracy; the quick test)."""
    check_tuned(methods)
    records, n, t0 = [], len(methods) * len(tasks), time.time()
    split, key = ("test", "test_acc") if protocol == "final" else ("val", "val_acc")
    for i, (task, m) in enumerate(((t, m) for t in tasks for m in methods), 1):
        rec = run_one(m, task, out / RUN_DIRS[protocol] / m / task / f"seed{seed}", protocol,
                      [f"seed={seed}", *overrides], rerun)
        records.append(rec)
        print(f"[{i}/{n}] {m:12s} {task:12s} {split} {rec[key]:6.2f}%  lr {rec['config']['optim']['lr']:.1e}  "
              f"{rec['wall_time_s']:.0f}s  (total {time.time() - t0:.0f}s)", flush=True)
    return records


def main(argv=None) -> int:
    from peft_vit.data.proxy import TASKS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--out", default=str(REPO / "outputs" / "proxy"))
    ap.add_argument("--tune", action="store_true", help="redo the learning-rate tuning first (protocol=tune)")
    ap.add_argument("--tune-only", action="store_true", help="tune, then stop")
    ap.add_argument("--epochs", type=int, default=None, help="override trainer.epochs (default: the experiment's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--rerun", action="store_true", help="redo runs whose results.json exists")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.batch_size=64")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    methods = a.methods or registered_methods()
    unknown = sorted(set(methods) - set(registered_methods()))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; registered: {registered_methods()}")
    out = Path(a.out)
    t0 = time.time()
    if a.tune or a.tune_only:
        tune(methods, out, a.epochs, a.rerun)
        if a.tune_only:
            return 0
    overrides = list(a.overrides) + ([f"trainer.epochs={a.epochs}"] if a.epochs else [])
    benchmark(methods, a.tasks, out, overrides, a.rerun, a.seed)
    table = make_table(collect(out).query("seed == @a.seed"), methods, a.tasks)
    md = to_markdown(table)
    (out / "proxy_table.md").write_text(md + "\n")
    table.to_csv(out / "proxy_table.csv", float_format="%.4g")
    plot(table, out / "proxy_acc_vs_params.png")
    print(md)
    print(f"{len(methods)} methods x {len(a.tasks)} tasks in {time.time() - t0:.0f}s -> {out}/proxy_table.md, "
          f"proxy_table.csv, proxy_acc_vs_params.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
