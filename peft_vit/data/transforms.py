"""Image transforms shared by every source."""
from __future__ import annotations

from typing import Tuple

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # NOAH, FacT, ARC
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # RLRR; Google's ViT preprocessing
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def normalization(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    if name not in NORMALIZATIONS:
        raise ValueError(f"dataset.normalize={name!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]
