"""The offline demo: scikit-learn's bundled 8x8 digits, upsampled, on a fixed split of 1000
train and 797 test images (in the spirit of VTAB-1k: 800 train + 200 val = 1000)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import DataSplits, register_source
from .memory import InMemoryImages

SPLIT_SEED = 0  # the split is fixed; the run seed does not move it


def load_digits_tensors(img_size: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return x[perm], y[perm]


@register_source("digits")
def build(dcfg, protocol: str) -> DataSplits:
    x, y = load_digits_tensors(int(dcfg.img_size))
    idx = {"train800": slice(0, 800), "val200": slice(800, 1000),
           "train800val200": slice(0, 1000), "test": slice(1000, None)}
    train_split, eval_split = ("train800", "val200") if protocol == "tune" else ("train800val200", "test")
    mk = lambda s, flip: InMemoryImages(x[idx[s]], y[idx[s]], dcfg.normalize, flip)  # noqa: E731
    return DataSplits(mk(train_split, bool(dcfg.get("flip", False))), mk(eval_split, False),
                      train_split, eval_split, 10)
