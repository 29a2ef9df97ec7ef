"""Bottleneck adapters, as run for the VTAB tables by NOAH (ZhangYuanhan-AI/NOAH).

Default (``placement: pfeiffer``, NOAH's): one sequential adapter per block, after the MLP branch
and before its residual add::

    x = x + A(DropPath(MLP(LN2(x)))),   A(z) = z + W_up · Dropout(act(W_down z + b_d)) + b_u

bottleneck 8, QuickGELU, dropout 0.1, xavier-uniform weights and N(0, 1e-6) biases (so it is
*not* the identity at start). 12 · (768·8 + 8 + 8·768 + 768) = 156,768 parameters on ViT-B/16.

Other placement: ``houlsby``, the same adapter after the attention branch too (two per block,
313,536). AdaptFormer's parallel adapter is its own method, ``adaptformer`` (adaptformer.py),
built from the same :class:`Adapter` module (``residual=False``).

Initialisation (``init``): ``paper`` (default) is xavier-uniform weights and N(0, 1e-6) biases
(``xavier``; ``lora``: down kaiming-uniform, up and biases zero, AdaptFormer's; either can be
named directly). ``noah`` is what NOAH's code actually runs: its model calls ``init_weights``
after building the blocks, which re-initialises every Linear, the adapters' included, to
trunc-normal(std 0.02) weights and zero biases. The ``vtab_noah`` preset uses it.

Adapters have a non-linearity between their projections: not mergeable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import get_act_layer

from .base import Method, PeftModule, block_names, insert_after, register_method

PLACEMENTS = ("pfeiffer", "houlsby")


ACTIVATIONS = {"quick_gelu": get_act_layer("quick_gelu"), "relu": nn.ReLU, "gelu": nn.GELU}  # x·σ(1.702x)


class Adapter(PeftModule):
    """``[z +] scale · up(Dropout(act(down(z))))``; ``residual=False`` for a parallel branch."""

    def __init__(self, dim: int, bottleneck: int, act: str = "quick_gelu", dropout: float = 0.1,
                 scale: float = 1.0, init: str = "xavier", residual: bool = True):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"adapter act={act!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = float(scale)
        self.residual = residual
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "xavier":  # NOAH: xavier-uniform weights, tiny biases
            for lin in (self.down, self.up):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
        elif init == "lora":  # AdaptFormer: down as nn.Linear's default, up and biases zero
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
        elif init == "noah":  # NOAH's init_weights, run after the model is built
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        else:
            raise ValueError(f"adapter init={init!r}; choose paper, noah, xavier or lora")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.dropout(self.act(self.down(z))))
        if self.scale != 1.0:
            h = h * self.scale
        return z + h if self.residual else h


@register_method("adapter")
class AdapterMethod(Method):
    mergeable = False

    def __init__(self, bottleneck: int = 8, dropout: float = 0.1, placement: str = "pfeiffer",
                 act: str = "quick_gelu", scale: float = 1.0, init: str = "paper",
                 blocks: Optional[str] = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"adapter placement={placement!r}; choose one of {', '.join(PLACEMENTS)}")
        self.bottleneck = int(bottleneck)
        self.dropout = float(dropout)
        self.placement = placement
        self.act = act
        self.scale = float(scale)
        self.init = "xavier" if init == "paper" else init
        self.blocks = blocks

    def _adapter(self, dim: int, residual: bool) -> Adapter:
        return Adapter(dim, self.bottleneck, self.act, self.dropout, self.scale, self.init, residual)

    def inject(self, model: nn.Module) -> None:
        for b in block_names(model, self.blocks):
            dim = model.get_submodule(f"{b}.norm2").normalized_shape[-1]
            if self.placement == "houlsby":
                insert_after(model, f"{b}.drop_path1", self._adapter(dim, residual=True))
            insert_after(model, f"{b}.drop_path2", self._adapter(dim, residual=True))
