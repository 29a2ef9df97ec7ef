#!/usr/bin/env python
"""Pretrain the proxy benchmark's small ViT on procedurally generated images.

    python scripts/proxy_pretrain.py                      # -> weights/proxy_vit.safetensors (+ .json)
    python scripts/proxy_pretrain.py --steps 200 --out /tmp/vit.safetensors   # a quick try

The data (``peft_vit.data.proxy.pretrain_batch``) is drawn fresh every step from a generator
seeded with ``--seed``: 32 classes = 8 shapes x 4 textures; 1-2 copies of the object in a
random hue at random positions, scales and rotations on a random background. ``--init`` starts
from earlier weights (all but the head), to continue a pretraining. Everything else a transfer
task asks (count, position, orientation, distance, new shapes and textures, digits, spectra)
is a nuisance here or absent. The model is timm's ``vit_tiny_patch16_224`` at 32 px with
patch 8, width 96, depth 6 and 3 heads (configs/model/vit_proxy.yaml); the weights load through
the normal path, ``model.checkpoint=weights/proxy_vit.safetensors``.

Deterministic from ``--seed`` on a given machine and thread count (data, initialisation and
the order of updates); the JSON beside the weights records the command, seed, versions, time
and the held-out accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from peft_vit.data import proxy  # noqa: E402
from peft_vit.data.transforms import normalization  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(name="vit_tiny_patch16_224", img_size=proxy.IMG, patch_size=8, embed_dim=96, depth=6, num_heads=3)
NORMALIZE = "half"  # the proxy dataset configs use the same


def build_model(num_classes: int = proxy.NUM_PRETRAIN_CLASSES):
    import timm

    kw = {k: v for k, v in ARCH.items() if k != "name"}
    return timm.create_model(ARCH["name"], pretrained=False, num_classes=num_classes, **kw)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = normalization(NORMALIZE)
    return (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def held_out_accuracy(model, seed: int, n: int = 2048) -> float:
    model.eval()
    x, y = proxy.pretrain_batch(torch.Generator().manual_seed(seed + 1_000_003), n)
    acc = sum((model(normalize(x[i:i + 256])).argmax(-1) == y[i:i + 256]).sum().item() for i in range(0, n, 256))
    model.train()
    return 100.0 * acc / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine to 1%% of --lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", default=str(REPO / "weights" / "proxy_vit.safetensors"))
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--init", default=None, help="start from these weights (.safetensors; the head is re-initialised)")
    a = ap.parse_args(argv)

    from safetensors.torch import save_file
    from timm.scheduler import CosineLRScheduler

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = build_model()
    init_meta = None
    if a.init:
        from safetensors.torch import load_file

        state = {k: v for k, v in load_file(a.init).items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"head.weight", "head.bias"}:
            raise ValueError(f"--init {a.init}: not this architecture (missing {missing}, unexpected {unexpected})")
        meta_file = Path(a.init).with_suffix(".json")
        init_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else str(a.init)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = CosineLRScheduler(opt, t_initial=a.steps, lr_min=a.lr / 100, warmup_t=a.warmup, warmup_lr_init=a.lr / 100,
                              t_in_epochs=False)
    g = torch.Generator().manual_seed(a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining {ARCH} ({n_params:,} params) on {proxy.NUM_PRETRAIN_CLASSES} procedural classes: "
          f"{a.steps} steps x {a.batch_size} images, {a.threads} threads", flush=True)
    t0, running = time.time(), None
    for step in range(a.steps):
        x, y = proxy.pretrain_batch(g, a.batch_size)
        loss = F.cross_entropy(model(normalize(x)), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step_update(step + 1)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if not math.isfinite(running):
            raise FloatingPointError(f"loss is {running} at step {step}; lower --lr")
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            el = time.time() - t0
            print(f"step {step + 1}/{a.steps}  loss {running:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{el:.0f}s elapsed, ~{el / (step + 1) * (a.steps - step - 1):.0f}s left", flush=True)
    train_s = time.time() - t0
    acc = held_out_accuracy(model, a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"arch": json.dumps(ARCH), "seed": str(a.seed)})
    import timm

    meta = {
        "command": "python scripts/proxy_pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": a.seed, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "weight_decay": a.weight_decay,
        "warmup": a.warmup, "threads": a.threads, "init": init_meta, "arch": ARCH, "normalize": NORMALIZE, "params": n_params,
        "classes": proxy.NUM_PRETRAIN_CLASSES, "generator_version": proxy.VERSION,
        "held_out_top1": round(acc, 2), "train_seconds": round(train_s, 1),
        "images_per_s": round(a.steps * a.batch_size / train_s, 1),
        "machine": f"{platform.processor() or platform.machine()}, {a.threads} threads (shared with other jobs)",
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"held-out top-1 {acc:.2f}% on {proxy.NUM_PRETRAIN_CLASSES} classes | {train_s:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
