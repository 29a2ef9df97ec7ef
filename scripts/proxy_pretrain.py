#!/usr/bin/env python
"""Pretrain the proxy benchmark's small ViT on procedurally generated images.

    python scripts/proxy_pretrain.py --threads 1          # -> weights/proxy_vit.safetensors (+ .json)
    python scripts/proxy_pretrain.py --stages shape:200 --out /tmp/vit.safetensors   # a quick try

The data (``peft_vit.data.proxy.pretrain_batch``) is drawn fresh every step from a generator
seeded with ``--seed``: 1-2 copies of an object in a random hue at random positions, scales and
rotations on a random background. The shipped weights come from two stages, run in order by
the default ``--stages hue:1800,shape:2200`` (``<stage>:<steps>``, ``proxy.PRETRAIN_STAGES``):
``hue``, 256 classes = 8 shapes x 8 hues x 4 textures, then ``shape``, 32 classes = 8 shapes x 4
textures with hue a nuisance, starting from the first stage's weights with a new head, a new
optimiser and schedule, and the seeds reset (as the two separate commands that first made them).
``--init`` starts the first stage from earlier weights (all but the head). Everything else a
transfer task asks (count, position, orientation, distance, new shapes and textures, digits,
spectra) is a nuisance here or absent. The model is timm's ``vit_tiny_patch16_224`` at 32 px
with patch 8, width 96, depth 6 and 3 heads (configs/model/vit_proxy.yaml); the weights load
through the normal path, ``model.checkpoint=weights/proxy_vit.safetensors``.

Deterministic from ``--seed`` on a given machine and thread count (data, initialisation and
the order of updates); the JSON beside the weights records the command, seed, versions, time
and each stage's held-out accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
def held_out_accuracy(model, seed: int, stage: str, n: int = 2048) -> float:
    model.eval()
    x, y = proxy.pretrain_batch(torch.Generator().manual_seed(seed + 1_000_003), n, stage)
    acc = sum((model(normalize(x[i:i + 256])).argmax(-1) == y[i:i + 256]).sum().item() for i in range(0, n, 256))
    model.train()
    return 100.0 * acc / n


def parse_stages(text: str) -> List[Tuple[str, int]]:
    stages = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in proxy.PRETRAIN_STAGES or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(f"--stages item {item!r}: expected <stage>:<steps> with a stage in "
                                             f"{', '.join(proxy.PRETRAIN_STAGES)}, e.g. hue:1800,shape:2200")
        stages.append((name, int(steps)))
    return stages


def train_stage(a, stage: str, steps: int, init: Optional[Dict[str, torch.Tensor]]):
    """One stage from scratch or from ``init`` (every weight but the head): seeds, optimiser and
    schedule start afresh. Returns the model and the stage's record."""
    from timm.scheduler import CosineLRScheduler

    torch.manual_seed(a.seed)
    model = build_model(proxy.pretrain_classes(stage))
    if init is not None:
        missing, unexpected = model.load_state_dict({k: v for k, v in init.items() if not k.startswith("head.")},
                                                    strict=False)
        if unexpected or set(missing) != {"head.weight", "head.bias"}:
            raise ValueError(f"initial weights: not this architecture (missing {missing}, unexpected {unexpected})")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=a.lr / 100, warmup_t=a.warmup, warmup_lr_init=a.lr / 100,
                              t_in_epochs=False)
    g = torch.Generator().manual_seed(a.seed)
    classes = proxy.pretrain_classes(stage)
    print(f"stage {stage}: {steps} steps x {a.batch_size} images on {classes} procedural classes, "
          f"{a.threads} threads", flush=True)
    t0, running = time.time(), None
    for step in range(steps):
        x, y = proxy.pretrain_batch(g, a.batch_size, stage)
        loss = F.cross_entropy(model(normalize(x)), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step_update(step + 1)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if not math.isfinite(running):
            raise FloatingPointError(f"loss is {running} at step {step} of stage {stage}; lower --lr")
        if (step + 1) % a.log_every == 0 or step + 1 == steps:
            el = time.time() - t0
            print(f"[{stage}] step {step + 1}/{steps}  loss {running:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{el:.0f}s elapsed, ~{el / (step + 1) * (steps - step - 1):.0f}s left", flush=True)
    train_s = time.time() - t0
    acc = held_out_accuracy(model, a.seed, stage, a.held_out)
    print(f"stage {stage}: held-out top-1 {acc:.2f}% on {classes} classes | {train_s:.0f}s", flush=True)
    return model, {"stage": stage, "steps": steps, "classes": classes, "held_out_top1": round(acc, 2),
                   "train_seconds": round(train_s, 1), "images_per_s": round(steps * a.batch_size / train_s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=parse_stages, default=parse_stages("hue:1800,shape:2200"),
                    help="<stage>:<steps>, comma-separated, run in order (default: the shipped hue:1800,shape:2200)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine to 1%% of --lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", default=str(REPO / "weights" / "proxy_vit.safetensors"))
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--held-out", type=int, default=2048, help="images of the held-out accuracy after each stage")
    ap.add_argument("--init", default=None, help="start the first stage from these weights (.safetensors; the head "
                                                 "is re-initialised)")
    a = ap.parse_args(argv)

    import timm
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(a.threads)
    state = load_file(a.init) if a.init else None
    model, records = None, []
    for stage, steps in a.stages:
        model, rec = train_stage(a, stage, steps, state)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        records.append(rec)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"arch": json.dumps(ARCH), "seed": str(a.seed)})
    meta = {
        "command": "python scripts/proxy_pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": a.seed, "stages": records, "batch_size": a.batch_size, "lr": a.lr, "weight_decay": a.weight_decay,
        "warmup": a.warmup, "threads": a.threads, "init": a.init, "arch": ARCH, "normalize": NORMALIZE,
        "params": sum(p.numel() for p in model.parameters()), "classes": records[-1]["classes"],
        "generator_version": proxy.VERSION,
        "held_out_top1": records[-1]["held_out_top1"],
        "train_seconds": round(sum(r["train_seconds"] for r in records), 1),
        "machine": f"{platform.processor() or platform.machine()}, {a.threads} threads (shared with other jobs)",
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
