#!/usr/bin/env python
"""One VTAB-1k-shaped task end to end, per method: `python train.py` on a generated task, timed.

Generates a task in NOAH's layout (1,000 training JPEGs + ``--test`` test JPEGs of natural size,
500x375, written by one process per core), decodes it into the cache once (timed: what a
first run pays), then runs train.py for each method and prints start-up s (model built and
data ready, from results.json), training and evaluation images/s, total wall s (the process,
imports included) and GPU utilisation (sampled from nvidia-smi every second, where it exists).
``--peer`` adds a peer-style reference loop: LoRA, fp32, PIL decoding at every step, batch 64,
in DataLoader workers; its task time is projected from its measured rates.

    python scripts/benchmark_task.py                                     # 3 methods, ViT-B/16 (random init)
    python scripts/benchmark_task.py --methods lora --peer --json bench.json
    python scripts/benchmark_task.py --methods linear --train 40 --test 20 --epochs 2 \\
        --override model=vit_tiny_test trainer.batch_size=8              # a quick look on CPU

Defaults are the targets' setting: ViT-B/16, 100 epochs on 1,000 images, evaluation every 10
epochs on 10,000 test images; three methods fit in 8 minutes on one H100/H200.
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


def train_run(method: str, common: list, out: Path, timeout: float) -> dict:
    run_dir = out / method
    cmd = [sys.executable, "train.py", f"method={method}", *common, f"hydra.run.dir={run_dir}"]
    gpu = GpuSampler()
    gpu.start()
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "WANDB_MODE": "disabled"})
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"over --timeout {timeout:.0f}s", **gpu.stop()}
    wall = time.time() - t0
    util = gpu.stop()
    if r.returncode != 0:
        return {"method": method, "error": f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}", **util}
    from peft_vit.record import RESULTS, RunRecord

    rec = RunRecord.read(run_dir / RESULTS)
    return {"method": method, "startup_s": rec.startup_s, "train_img_s": rec.train_images_per_s,
            "eval_img_s": rec.eval_images_per_s, "run_s": rec.wall_time_s, "wall_s": round(wall, 1),
            "acc": rec.accuracy, **util}


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
    p.add_argument("--task", default="cifar", help="VTAB-1k task whose config (classes, flip) is used")
    p.add_argument("--train", type=int, default=1000, help="training images (train800 + val200)")
    p.add_argument("--test", type=int, default=10_000, help="test images")
    p.add_argument("--src-size", default="500x375", help="generated JPEG size WxH")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--root", default=None, help="vtab-1k root to generate into (default: a temporary folder); "
                                                "an existing task folder there is used as it is")
    p.add_argument("--cache-dir", default=None, help="decode cache (default: a new temporary one)")
    p.add_argument("--override", nargs="*", default=[], help="extra train.py overrides, e.g. model=vit_tiny_test")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds allowed per train.py run")
    p.add_argument("--peer", action="store_true", help="also time the peer-style reference loop")
    p.add_argument("--peer-epochs", type=int, default=2, help="epochs the reference loop is timed over")
    p.add_argument("--peer-eval", type=int, default=1024, help="test images its evaluation is timed over")
    p.add_argument("--peer-workers", type=int, default=8, help="its DataLoader workers")
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(argv)

    import pandas as pd
    from peft_vit.data import vtab

    task = vtab.get_task(args.task)
    tmp = tempfile.TemporaryDirectory(prefix="peft-vit-task-")
    root = Path(args.root or Path(tmp.name) / "vtab-1k")
    cache = args.cache_dir or str(Path(tmp.name) / "cache")
    out = {"task": task.name, "train": args.train, "test": args.test, "epochs": args.epochs}
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

    rows = []
    for method in args.methods:
        rows.append(train_run(method, common, Path(tmp.name) / "runs", args.timeout))
        print(json.dumps(rows[-1]))
    out["runs"] = rows
    table = pd.DataFrame(rows).set_index("method")
    if args.peer:
        peer = peer_loop(compose([*cfg_overrides, "method=lora"]), folder, args.peer_epochs, args.peer_eval,
                         args.peer_workers)
        # the loop evaluates every eval_every epochs and after the last
        n_evals = args.epochs // args.eval_every + bool(args.epochs % args.eval_every) if args.eval_every else 1
        peer["projected_task_s"] = round(args.epochs * args.train / peer["train_img_s"]
                                         + n_evals * args.test / peer["eval_img_s"], 1)
        out["peer"] = peer
        print(f"peer-style loop (LoRA, fp32, PIL decoding every step, batch 64): {peer['train_img_s']} train img/s, "
              f"{peer['eval_img_s']} eval img/s -> a {args.epochs}-epoch task in ~{peer['projected_task_s']}s")
        if "wall_s" in table:
            table["speedup_vs_peer"] = (peer["projected_task_s"] / table["wall_s"]).round(1)
    print(table.to_string())
    if not shutil.which("nvidia-smi"):
        print("(no nvidia-smi: GPU utilisation not sampled)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    tmp.cleanup()
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
