#!/usr/bin/env python
"""Data-pipeline throughput: images/s for building the decode-once training set, for training
epochs served from it, and for a streamed test pass (DataLoader workers decoding from disk).

    python scripts/benchmark_data.py --generate                     # synthetic JPEGs, 500x375 like natural images
    python scripts/benchmark_data.py --task sun397 --root datasets/vtab-1k --workers 8
    python scripts/benchmark_data.py --generate --img-size 224 --test 4000 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from peft_vit.data import SeededAugment, vtab  # noqa: E402


def generate(root: Path, task: vtab.Task, n_train: int, n_test: int, size=(500, 375), quality: int = 90) -> None:
    """A NOAH-layout task folder of smooth random JPEGs (decode cost close to real photos)."""
    rng = np.random.default_rng(0)
    d = root / task.folder
    splits = {"train800": int(n_train * 0.8), "val200": n_train - int(n_train * 0.8), "test": n_test}
    for split, n in splits.items():
        (d / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.BICUBIC)
            rel = f"images/{split}/{i:06d}.jpg"
            img.save(d / rel, quality=quality)
            lines.append(f"{rel} {i % task.num_classes}\n")
        (d / f"{split}.txt").write_text("".join(lines))
    (d / "train800val200.txt").write_text((d / "train800.txt").read_text() + (d / "val200.txt").read_text())


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
    p.add_argument("--max-test", type=int, default=None, help="stop the test pass after this many images")
    p.add_argument("--cache-dir", default=None, help="also time the decode-once cache file")
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
        generate(Path(root), task, args.train, args.test, (w, h))
        print(f"generated {args.train} + {args.test} JPEGs of {w}x{h} in {time.time() - t0:.1f}s")
    dcfg = OmegaConf.create(dict(task=task.name, num_classes=task.num_classes, root=str(root), img_size=args.img_size,
                                 normalize="imagenet", flip=True, cache_dir=args.cache_dir, prepare_if_missing=False))
    out = {"task": task.name, "img_size": args.img_size, "workers": args.workers, "batch": args.batch,
           "threads": torch.get_num_threads()}

    t0 = time.time()
    data = vtab.build(dcfg, "final")
    n_train = len(data.train)
    out["decode_once_s"] = time.time() - t0
    print(f"decode once into uint8 {tuple(data.train.images.shape)}: {rate(n_train, out['decode_once_s'])}")
    if args.cache_dir:
        t0 = time.time()
        vtab.build(dcfg, "final")
        out["from_cache_file_s"] = time.time() - t0
        print(f"rebuild from the cache file:     {rate(n_train, out['from_cache_file_s'])}")

    loader = torch.utils.data.DataLoader(SeededAugment(data.train), batch_size=args.batch, shuffle=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         drop_last=True)
    seen, t0 = 0, time.time()
    for _ in range(args.epochs):
        for x, _ in loader:
            seen += len(x)
    out["train_img_s"] = seen / (time.time() - t0)
    print(f"training epochs from memory:     {rate(seen, time.time() - t0)}")

    loader = torch.utils.data.DataLoader(data.eval, batch_size=256, num_workers=args.workers)
    seen, t0 = 0, time.time()
    for x, _ in loader:
        seen += len(x)
        if args.max_test and seen >= args.max_test:
            break
    out["test_img_s"] = seen / (time.time() - t0)
    print(f"test pass, streamed from disk:   {rate(seen, time.time() - t0)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
