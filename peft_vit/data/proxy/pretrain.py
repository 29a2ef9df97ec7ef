"""The pretraining set of ``scripts/proxy_pretrain.py``: 32 classes = 8 shapes x 4 textures
(stage ``shape``), with hue, position, scale, rotation, count (1-2 copies) and background as
nuisances (never labels)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from .render import N_HUES, N_TEXTURES, PRETRAIN_SHAPES, _u, background, draw, palette, to_uint8


@dataclass(frozen=True)
class PretrainStage:
    """One stage of the shipped pretraining (scripts/proxy_pretrain.py runs them in order)."""
    hue_in_label: bool  # labels shape x hue x texture (256) instead of shape x texture (32)
    position: float  # object centres uniform in [-position, position] (units of half the image)
    radius: Tuple[float, float]  # object radius range, same units


PRETRAIN_STAGES = {
    # stage 1 (generator version 2): with hue in the label the backbone learnt colour and almost no
    # shape (held-out shape accuracy 21 %, chance 12.5 %) and transferred nothing to digits, so
    "hue": PretrainStage(True, 0.6, (0.22, 0.45)),
    # stage 2 continues from it with hue a nuisance: shape, not colour, decides the label
    "shape": PretrainStage(False, 0.5, (0.3, 0.6)),
}
NUM_PRETRAIN_CLASSES = PRETRAIN_SHAPES * N_TEXTURES  # 32 (the shipped head's, stage "shape")


def pretrain_classes(stage: str = "shape") -> int:
    return PRETRAIN_SHAPES * N_TEXTURES * (N_HUES if PRETRAIN_STAGES[stage].hue_in_label else 1)


def pretrain_batch(g: torch.Generator, n: int, stage: str = "shape") -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` pretraining images (uint8 (N, 3, 32, 32)) and labels (shape * 4 + texture, or
    shape * 32 + hue * 4 + texture for stage ``hue``). Each image holds 1-2 copies of its class's
    object (same shape, hue, texture), each at its own position, scale (stage ``shape``: radius
    5-10 px) and rotation, on a random background."""
    st = PRETRAIN_STAGES[stage]
    shape = torch.randint(0, PRETRAIN_SHAPES, (n,), generator=g)
    hue = torch.randint(0, N_HUES, (n,), generator=g)
    tex = torch.randint(0, N_TEXTURES, (n,), generator=g)
    count = torch.randint(1, 3, (n,), generator=g)
    img = background(g, n)
    colour = palette(g, hue)
    for k in range(2):
        img = draw(img, shape, _u(g, n, -st.position, st.position), _u(g, n, -st.position, st.position),
                   _u(g, n, *st.radius), _u(g, n, 0, 2 * math.pi), colour, tex, _u(g, n, 3.5, 6.0), visible=count > k)
    label = shape * (N_HUES * N_TEXTURES) + hue * N_TEXTURES + tex if st.hue_in_label else shape * N_TEXTURES + tex
    return to_uint8(img), label
