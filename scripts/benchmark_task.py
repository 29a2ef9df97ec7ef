#!/usr/bin/env python
"""One VTAB-1k-shaped task end to end, per method and mode: `python train.py` on a generated task, timed.

Generates a task in NOAH's layout (1,000 training JPEGs + ``--test`` test JPEGs of natural size,
500x375, written by one process per core), decodes it into the cache once (timed: what a
first run pays), then runs train.py for each mode (``eager``: ``trainer.compile=false``;
``compiled``: ``trainer.compile=true``) and method, and prints per run, in seconds:

  startup_s  model built and data ready (results.json ``startup_s``)
  compile_s  torch.compile compiling, by its own metric (``compile_time_s``; 0 when eager)
  train_s    training, compile left out: epochs x training images / ``train_images_per_s``
  eval_s     evaluation: evaluations x test images / ``eval_images_per_s``
  total_s    the train.py process's wall time, imports included
  other_s    the rest of total_s: imports, Hydra, the record, and torch.compile's costs outside its
             own metric (importing inductor, for one)
  task_s     total_s projected to the targets' task (100 epochs, an evaluation every 10 on the
             task's full test set, ``--target-*``): start-up, compile and the rest once, training
             and evaluation scaled from their measured rates

plus training and evaluation images/s, the accuracy and GPU utilisation (sampled from
nvidia-smi every second, where it exists); ``compile_pays`` is the eager run's task_s over the
compiled run's (above 1: compiling pays for that method). The JSON (``--json``) is rewritten
after every run, so a stopped check keeps what it finished. ``--peer`` adds a peer-style
reference loop: LoRA, fp32, PIL decoding at every step, batch 64, in DataLoader workers; its task
time is projected from its measured rates.

    python scripts/benchmark_task.py --json task.json                    # the GPU check (scripts/gpu_check.sh)
    python scripts/benchmark_task.py --methods lora --modes eager --peer --epochs 100 --eval-every 10
    python scripts/benchmark_task.py --methods linear --train 40 --test 20 --epochs 2 --compile-backend eager \\
        --override model=vit_tiny_test trainer.batch_size=8              # a quick look on CPU

Defaults: ViT-B/16 (random init), three methods, eager then compiled, 10 epochs on 1,000 images,
evaluated after epochs 5 and 10 on 5,000 test images; the six runs, the data and their start-ups
are sized to fit one device call of about 8 minutes on one H100/H200 (``task_s`` gives the
100-epoch task). ``--compile-backend`` sets torch.compile's backend for the compiled runs
(``PEFT_VIT_COMPILE_BACKEND``; default inductor): ``eager`` traces only, seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# a sibling script: scripts/ is on sys.path as this script's folder (and in pytest's pythonpath)
from benchmark_data import generate  # noqa: E402


class GpuSampler(threading.Thread):
    """GPU utilisation (%) from ``nvidia-smi`` every ``every`` seconds until stopped."""

    def __init__(self, every: float = 1.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.halt = every, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self):
        while self.available and not self.halt.is_set():
            r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i",
                                os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip().isdigit():
                self.samples.append(int(r.stdout.strip()))
            self.halt.wait(self.every)

    def stop(self) -> dict:
        self.halt.set()
        if self.is_alive():
            self.join()
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_idle_frac": None}
        return {"gpu_util_mean": round(sum(self.samples) / len(self.samples), 1),
                "gpu_util_idle_frac": round(sum(s == 0 for s in self.samples) / len(self.samples), 2)}


def compose(overrides):
    from hydra import compose as hcompose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


MODES = {"eager": "trainer.compile=false", "compiled": "trainer.compile=true"}


def train_run(method: str, mode: str, common: list, out: Path, timeout: float, env: dict, sizes: dict) -> dict:
    """``python train.py`` for one method in one mode; its record's figures (:func:`seconds`)."""
    run_dir = out / mode / method
    cmd = [sys.executable, "train.py", f"method={method}", MODES[mode], *common, f"hydra.run.dir={run_dir}"]
    row = {"method": method, "mode": mode}
    if timeout <= 0:
        return {**row, "error": "skipped: --budget spent"}
    gpu = GpuSampler()
    gpu.start()
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:  # what it printed last says where it was
        said = e.stderr or e.stdout or b""
        said = (said.decode(errors="replace") if isinstance(said, bytes) else said).strip()[-400:]
        return {**row, "error": f"over its {timeout:.0f}s (--timeout, --budget): {said}", **gpu.stop()}
    wall = time.time() - t0
    util = gpu.stop()
    if r.returncode != 0:
        return {**row, "error": f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}", **util}
    from peft_vit.record import RESULTS, RunRecord

    rec = RunRecord.read(run_dir / RESULTS)
    return {**row, **seconds(rec, wall, sizes), "acc": rec.accuracy, **util}


def seconds(rec, wall: float, sizes: dict) -> dict:
    """Start-up, compile, train, evaluation and total seconds of one run from its record: training
    and evaluation seconds from their images/s and the images each saw: every epoch the training
    split, every evaluation the evaluated one (``sizes``: images per split). The loop times both
    without compiling."""
    train_images = rec.epochs * sizes[rec.train_split]
    eval_images = len(rec.history) * sizes[rec.eval_split]
    return {"startup_s": rec.startup_s, "compile_s": rec.compile_time_s,
            "train_s": round(train_images / rec.train_images_per_s, 2),
            "eval_s": round(eval_images / rec.eval_images_per_s, 2),
            "total_s": round(wall, 1),
            "other_s": round(wall - rec.startup_s - rec.compile_time_s - train_images / rec.train_images_per_s
                             - eval_images / rec.eval_images_per_s, 1),
            "run_s": rec.wall_time_s, "compiled": rec.compiled,
            "train_img_s": rec.train_images_per_s, "eval_img_s": rec.eval_images_per_s, "evals": len(rec.history)}


def n_evals(epochs: int, every: int) -> int:
    """Evaluations in a run: the loop evaluates every ``every`` epochs (0: never) and after the last."""
    return epochs // every + bool(epochs % every) if every else 1


def project(row: dict, target_epochs: int, n_train: int, target_evals: int, target_test: int) -> float:
    """``total_s`` of a run at the targets' task: start-up, compile and the process's other time
    once; training ``target_epochs`` x ``n_train`` images and ``target_evals`` evaluations of
    ``target_test`` images at the measured rates."""
    return round(row["total_s"] - row["train_s"] - row["eval_s"] + target_epochs * n_train / row["train_img_s"] + target_evals * target_test / row["eval_img_s"], 1)


def peer_loop(cfg, folder: Path, epochs: int, eval_images: int, workers: int) -> dict:
    """LoRA through the project's method, fp32, every image decoded by PIL at every step (in
    DataLoader workers), batch 64, as a typical research loop does."""
    import torch
    import torch.nn.functional as F

    from peft_vit import build_model
    from peft_vit.data.folder import ImageList, read_list
    from peft_vit.data.transforms import ResizeSquare

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg).to(device)
    resize, n_cls = ResizeSquare(int(cfg.model.img_size)), int(cfg.dataset.num_classes)
    train = ImageList(read_list(folder / "train800val200.txt", n_cls), resize, cfg.dataset.normalize)
    test = ImageList(read_list(folder / "test.txt", n_cls), resize, cfg.dataset.normalize)
    kw = dict(batch_size=64, num_workers=workers, persistent_workers=workers > 0)
    loader = torch.utils.data.DataLoader(train, shuffle=True, **kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    seen, t0 = 0, time.time()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_rate = seen / (time.time() - t0)
    sub = torch.utils.data.Subset(test, range(min(eval_images, len(test))))
    model.eval()
    seen, t0 = 0, time.time()
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(sub, **kw):
            model(x.to(device)).argmax(-1).cpu()
            seen += len(x)
    return {"train_img_s": round(train_rate, 1), "eval_img_s": round(seen / (time.time() - t0), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["householder", "lora", "adapter"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=sorted(MODES),
                   help="eager: trainer.compile=false; compiled: trainer.compile=true (each mode runs every method)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the compiled runs (PEFT_VIT_COMPILE_BACKEND; default: inductor)")
    p.add_argument("--task", default="cifar", help="VTAB-1k task whose config (classes, flip) is used")
    p.add_argument("--train", type=int, default=1000, help="training images (train800 + val200)")
    p.add_argument("--test", type=int, default=5000, help="test images")
    p.add_argument("--src-size", default="500x375", help="generated JPEG size WxH")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--target-epochs", type=int, default=100, help="task_s: the task's epochs")
    p.add_argument("--target-eval-every", type=int, default=10, help="task_s: its evaluation interval")
    p.add_argument("--root", default=None, help="vtab-1k root to generate into (default: a temporary folder); "
                                                "an existing task folder there is used as it is")
    p.add_argument("--cache-dir", default=None, help="decode cache (default: a new temporary one)")
    p.add_argument("--override", nargs="*", default=[], help="extra train.py overrides, e.g. model=vit_tiny_test")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds allowed per train.py run")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all the runs: a run gets at most what is left, later ones are skipped")
    p.add_argument("--peer", action="store_true", help="also time the peer-style reference loop")
    p.add_argument("--peer-epochs", type=int, default=2, help="epochs the reference loop is timed over")
    p.add_argument("--peer-eval", type=int, default=1024, help="test images its evaluation is timed over")
    p.add_argument("--peer-workers", type=int, default=8, help="its DataLoader workers")
    p.add_argument("--json", default=None, help="write every figure here (after every run)")
    args = p.parse_args(argv)

    import pandas as pd
    from peft_vit.data import vtab

    t_start = time.time()
    task = vtab.get_task(args.task)
    tmp = tempfile.TemporaryDirectory(prefix="peft-vit-task-")
    root = Path(args.root or Path(tmp.name) / "vtab-1k")
    cache = args.cache_dir or str(Path(tmp.name) / "cache")
    out = {"task": task.name, "train": args.train, "test": args.test, "epochs": args.epochs,
           "eval_every": args.eval_every, "modes": args.modes, "compile_backend": args.compile_backend or "inductor",
           "overrides": args.override}
    folder = root / task.folder
    if not (folder / "test.txt").is_file():
        w, h = (int(v) for v in args.src_size.split("x"))
        t0 = time.time()
        generate(root, task, args.train, args.test, (w, h))
        out["generate_s"] = round(time.time() - t0, 1)
        print(f"generated {args.train} + {args.test} JPEGs of {w}x{h} in {out['generate_s']}s under {root}")

    common = [f"dataset=vtab/{task.name}", f"dataset.root={root}", f"paths.cache_dir={cache}", "model.pretrained=false",
              "logger=none", "protocol=final", f"trainer.epochs={args.epochs}", f"trainer.eval_every={args.eval_every}",
              "trainer.progress=false", "trainer.save_weights=false", "skip_done=false", *args.override]
    cfg_overrides = [c for c in common if not c.startswith("hydra.")]
    cfg = compose(cfg_overrides)
    t0 = time.time()
    vtab.build(cfg.dataset, "final")  # what a first run pays once: decode train + test into the cache
    out["cache_build_s"] = round(time.time() - t0, 1)
    print(f"decoded into the cache ({cache}) in {out['cache_build_s']}s; every run below starts warm")
    sizes = {split: sum(1 for _ in open(folder / f"{split}.txt")) for split in ("train800val200", "test")}
    n_test = sizes["test"]

    env = {**os.environ, "WANDB_MODE": "disabled"}
    if args.compile_backend:
        env["PEFT_VIT_COMPILE_BACKEND"] = args.compile_backend
    target_evals = n_evals(args.target_epochs, args.target_eval_every)
    rows = []
    for mode in args.modes:  # every eager run first: the reference, and what a stopped check most needs
        for method in args.methods:
            left = args.timeout if args.budget is None else min(args.timeout, args.budget - (time.time() - t_start))
            row = train_run(method, mode, common, Path(tmp.name) / "runs", left, env, sizes)
            if "error" not in row:
                row["task_s"] = project(row, args.target_epochs, sizes["train800val200"], target_evals, task.test_size)
            rows.append(row)
            print(json.dumps(row), flush=True)
            out["runs"] = rows
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2))
    order = sorted(rows, key=lambda r: (args.methods.index(r["method"]), args.modes.index(r["mode"])))
    table = pd.DataFrame(order).set_index(["method", "mode"])  # a method's modes side by side
    if "task_s" in table and {"eager", "compiled"} <= set(args.modes):
        eager = table.xs("eager", level="mode")["task_s"]
        compiled = table.xs("compiled", level="mode")["task_s"]
        table["compile_pays"] = float("nan")
        for method in args.methods:
            if pd.notna(eager.get(method)) and pd.notna(compiled.get(method)):
                table.loc[(method, "compiled"), "compile_pays"] = round(eager[method] / compiled[method], 2)
    if args.peer:
        peer = peer_loop(compose([*cfg_overrides, "method=lora"]), folder, args.peer_epochs, args.peer_eval,
                         args.peer_workers)
        peer["projected_task_s"] = round(args.epochs * args.train / peer["train_img_s"]
                                         + n_evals(args.epochs, args.eval_every) * args.test / peer["eval_img_s"], 1)
        out["peer"] = peer
        print(f"peer-style loop (LoRA, fp32, PIL decoding every step, batch 64): {peer['train_img_s']} train img/s, "
              f"{peer['eval_img_s']} eval img/s -> a {args.epochs}-epoch task in ~{peer['projected_task_s']}s")
        if "total_s" in table:
            table["speedup_vs_peer"] = (peer["projected_task_s"] / table["total_s"]).round(1)
    columns = ["startup_s", "compile_s", "train_s", "eval_s", "other_s", "total_s", "task_s", "compile_pays", "train_img_s",
               "eval_img_s", "acc", "gpu_util_mean", "gpu_util_idle_frac", "speedup_vs_peer", "error"]
    shown = table[[c for c in columns if c in table]]
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 80):
        print(shown.to_string())
    print(f"seconds; a {task.name}-shaped task: {sizes['train800val200']} training images x {args.epochs} epochs, "
          f"{n_evals(args.epochs, args.eval_every)} evaluation(s) of {n_test} test images; task_s: "
          f"{args.target_epochs} epochs, {target_evals} evaluation(s) of {task.test_size}; compile backend "
          f"{out['compile_backend']}")
    if not shutil.which("nvidia-smi"):
        print("(no nvidia-smi: GPU utilisation not sampled)")
    out["table"] = shown.to_string()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    tmp.cleanup()
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
