"""Bottleneck adapters, as run for the VTAB tables by NOAH (ZhangYuanhan-AI/NOAH).

Default (``placement: pfeiffer``, NOAH's): one sequential adapter per block, after the MLP branch
and before its residual add::

    x = x + A(DropPath(MLP(LN2(x)))),   A(z) = z + W_up · Dropout(act(W_down z + b_d)) + b_u

bottleneck 8, QuickGELU, dropout 0.1, xavier-uniform weights and N(0, 1e-6) biases (so it is
*not* the identity at start). 12 · (768·8 + 8 + 8·768 + 768) = 156,768 parameters on ViT-B/16.

Other placements:

* ``houlsby``: the same adapter after the attention branch too (two per block, 313,536).
* ``adaptformer``: parallel to the MLP, reading the block's pre-LN stream::

      x = x + DropPath(MLP(LN2(x))) + s · W_up · Dropout(ReLU(W_down x + b_d)) + b_u

  with s = 0.1, W_down kaiming-uniform (a=√5), W_up and biases zero: the identity at start.

Initialisation (``init``): ``paper`` (default) is the placement's own, above (``xavier``:
xavier-uniform weights, N(0, 1e-6) biases; ``lora``: down kaiming-uniform, up and biases zero;
either can be named directly). ``noah`` is what NOAH's code actually runs: its model calls
``init_weights`` after building the blocks, which re-initialises every Linear, the adapters'
included, to trunc-normal(std 0.02) weights and zero biases. The ``vtab_noah`` preset uses it.

Adapters have a non-linearity between their projections: not mergeable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import get_act_layer

from .base import Method, PeftModule, block_names, insert_after, insert_parallel, register_method

PLACEMENTS = ("pfeiffer", "houlsby", "adaptformer")


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

    # placement -> (act, scale, init)
    DEFAULTS = {
        "pfeiffer": ("quick_gelu", 1.0, "xavier"),
        "houlsby": ("quick_gelu", 1.0, "xavier"),
        "adaptformer": ("relu", 0.1, "lora"),
    }

    def __init__(self, bottleneck: int = 8, dropout: float = 0.1, placement: str = "pfeiffer",
                 act: Optional[str] = None, scale: Optional[float] = None, init: Optional[str] = "paper",
                 blocks: Optional[str] = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"adapter placement={placement!r}; choose one of {', '.join(PLACEMENTS)}")
        d_act, d_scale, d_init = self.DEFAULTS[placement]
        self.bottleneck = int(bottleneck)
        self.dropout = float(dropout)
        self.placement = placement
        self.act = act or d_act
        self.scale = d_scale if scale is None else float(scale)
        self.init = d_init if init in (None, "paper") else init
        self.blocks = blocks

    def _adapter(self, dim: int, residual: bool) -> Adapter:
        return Adapter(dim, self.bottleneck, self.act, self.dropout, self.scale, self.init, residual)

    def inject(self, model: nn.Module) -> None:
        for b in block_names(model, self.blocks):
            dim = model.get_submodule(f"{b}.norm2").normalized_shape[-1]
            if self.placement == "adaptformer":
                # parallel to the MLP branch; input: the block's stream before LN2
                insert_parallel(model, f"{b}.drop_path2", self._adapter(dim, residual=False),
                                input_of=f"{b}.norm2")
                continue
            if self.placement == "houlsby":
                insert_after(model, f"{b}.drop_path1", self._adapter(dim, residual=True))
            insert_after(model, f"{b}.drop_path2", self._adapter(dim, residual=True))
