#!/usr/bin/env python
"""Data-pipeline throughput, each stage against the path it replaced: the first build of the
decode cache (train + test, one process per core) and a start from the warm cache; training
epochs served on the device (gather, normalise, flip per batch) against a per-item DataLoader;
a test pass read from the memory-mapped cache against DataLoader workers decoding JPEGs.

    python scripts/benchmark_data.py --generate                     # synthetic JPEGs, 500x375 like natural images
    python scripts/benchmark_data.py --task sun397 --root datasets/vtab-1k --workers 8
    python scripts/benchmark_data.py --generate --img-size 224 --test 4000 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from peft_vit.data import SeededAugment, vtab  # noqa: E402
from peft_vit.data.folder import ImageList, decode_workers  # noqa: E402
from peft_vit.data.loader import EvalBatches, GlobalBatchSampler, TrainBatches  # noqa: E402
from peft_vit.data.memory import InMemoryImages  # noqa: E402
from peft_vit.data.transforms import ResizeSquare  # noqa: E402


def _write_jpeg(job) -> None:
    path, seed, size, quality = job
    small = np.random.default_rng(seed).integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=quality)


def generate(root: Path, task: vtab.Task, n_train: int, n_test: int, size=(500, 375), quality: int = 90,
             workers: int = 0) -> None:
    """A NOAH-layout task folder of smooth random JPEGs (decode cost close to real photos),
    written by ``workers`` processes (0: one per core)."""
    d = root / task.folder
    splits = {"train800": int(n_train * 0.8), "val200": n_train - int(n_train * 0.8), "test": n_test}
    jobs = []
    for k, (split, n) in enumerate(splits.items()):
        (d / "images" / split).mkdir(parents=True, exist_ok=True)
        rels = [f"images/{split}/{i:06d}.jpg" for i in range(n)]
        jobs += [(d / rel, (k, i), size, quality) for i, rel in enumerate(rels)]
        (d / f"{split}.txt").write_text("".join(f"{rel} {i % task.num_classes}\n" for i, rel in enumerate(rels)))
    (d / "train800val200.txt").write_text((d / "train800.txt").read_text() + (d / "val200.txt").read_text())
    with multiprocessing.Pool(workers or decode_workers()) as pool:
        pool.map(_write_jpeg, jobs, chunksize=32)


def rate(n: int, seconds: float) -> str:
    return f"{n / max(seconds, 1e-9):8.0f} img/s  ({n} images, {seconds:.2f}s)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="cifar")
    p.add_argument("--root", default=None, help="vtab-1k root with real data")
    p.add_argument("--generate", action="store_true", help="benchmark on generated images in a temp folder")
    p.add_argument("--train", type=int, default=1000, help="generated training images (train800 + val200)")
    p.add_argument("--test", type=int, default=2000, help="generated test images")
    p.add_argument("--src-size", default="500x375", help="generated image size WxH")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3, help="training epochs to time")
    p.add_argument("--max-test", type=int, default=None, help="time the test passes on this many images")
    p.add_argument("--cache-dir", default=None, help="decode cache (default: a temporary one, cold)")
    p.add_argument("--device", default="auto", help="where the training batches go: auto | cpu | cuda")
    p.add_argument("--gen-workers", type=int, default=0, help="processes writing the JPEGs (0: one per core)")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    if not args.root and not args.generate:
        p.error("give --root (real data) or --generate")

    task = vtab.get_task(args.task)
    tmp = None
    root = args.root
    if args.generate:
        tmp = tempfile.TemporaryDirectory(prefix="peft-vit-bench-")
        root = tmp.name
        w, h = (int(v) for v in args.src_size.split("x"))
        t0 = time.time()
        generate(Path(root), task, args.train, args.test, (w, h), workers=args.gen_workers)
        print(f"generated {args.train} + {args.test} JPEGs of {w}x{h} in {time.time() - t0:.1f}s")
    cache_tmp = None if args.cache_dir else tempfile.TemporaryDirectory(prefix="peft-vit-cache-")
    cache_dir = args.cache_dir or cache_tmp.name
    dcfg = OmegaConf.create(dict(task=task.name, num_classes=task.num_classes, root=str(root), img_size=args.img_size,
                                 normalize="imagenet", flip=True, cache_dir=cache_dir, prepare_if_missing=False))
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    out = {"task": task.name, "img_size": args.img_size, "workers": args.workers, "batch": args.batch,
           "threads": torch.get_num_threads(), "decode_processes": decode_workers(), "device": str(device)}

    t0 = time.time()
    data = vtab.build(dcfg, "final")  # a cold cache when the folder is new: decodes train + test
    n_train, n_test = len(data.train), len(data.eval)
    out["first_build_s"] = time.time() - t0
    print(f"{'build (a cold cache: decode all):':34s}{rate(n_train + n_test, out['first_build_s'])}")
    t0 = time.time()
    data = vtab.build(dcfg, "final")
    out["from_cache_file_s"] = time.time() - t0
    print(f"{'data ready from the warm cache:':34s}{rate(n_train + n_test, out['from_cache_file_s'])}")

    def timed(batches, what, key):
        seen, t0 = 0, time.time()
        for x, _ in batches:
            seen += len(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        out[key] = seen / (time.time() - t0)
        print(f"{what:34s}{rate(seen, time.time() - t0)}")

    batches = TrainBatches(data.train, args.batch, 0, device)
    timed((b for e in range(args.epochs) for b in batches.epoch(e)), "training epochs, on the device:", "train_img_s")
    sampler = GlobalBatchSampler(n_train, args.batch, 0)  # the previous path: per item, in workers
    loader = torch.utils.data.DataLoader(SeededAugment(data.train), batch_sampler=sampler, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)

    def dataloader_epochs():
        for e in range(args.epochs):
            sampler.set_epoch(e)
            yield from loader

    timed(dataloader_epochs(), "training epochs, DataLoader:", "train_img_s_dataloader")

    eval_n = min(n_test, args.max_test or n_test)  # the test set, memory-mapped from the cache
    timed(EvalBatches(InMemoryImages(data.eval.images[:eval_n], data.eval.labels[:eval_n]), 256, device),
          "test pass, from the cache:", "eval_img_s_cache")
    streamed = ImageList(data.eval.listing, ResizeSquare(args.img_size), "imagenet")  # the previous path
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(streamed, range(eval_n)), batch_size=256,
                                         num_workers=args.workers)
    timed(loader, "test pass, decoding JPEGs:", "eval_img_s_decode")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    for t in (tmp, cache_tmp):
        if t:
            t.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
