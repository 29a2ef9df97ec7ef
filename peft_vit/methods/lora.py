"""LoRA as run for the VTAB tables (NOAH's code, ZhangYuanhan-AI/NOAH).

``W' = W + scale · B A`` in parallel with the frozen Linear, ``scale = alpha / rank``, dropout on
the LoRA input only. Initialisation (``init``):

* ``paper`` (default): A (rank × in) kaiming-uniform(a=√5), B (out × rank) zeros, so the model
  starts as the backbone (LoRA's paper; NOAH's LoRA module as written);
* ``noah``: as NOAH's code actually runs. Its model calls ``init_weights`` after building the
  blocks, which re-initialises every Linear, A and B included, to trunc-normal(std 0.02): B ≠ 0,
  so the model is *not* the backbone at start. The ``vtab_noah`` preset uses it.

Defaults: the fused ``qkv`` as ONE matrix (A 8×768, B 2304×8), rank 8, alpha 8 (scale 1, NOAH
applies no α/r scaling), dropout 0.1: 294,912 parameters on ViT-B/16. ``targets=[q, v]`` adapts
the q and v blocks of the fused projection separately (same count at rank 8).

Numerically identical to ``huggingface/peft``'s LoRA with the same A and B (tested). Several
blocks of one fused projection (``targets=[q, v]``) run together: methods/batched/lora.py.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .base import Delta, Method, adapt_linears, register_method


class LoRADelta(Delta):
    def __init__(self, out_features: int, in_features: int, rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, init: str = "paper"):
        super().__init__()
        if rank <= 0:
            raise ValueError("LoRA rank must be positive")
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        if init == "noah":  # NOAH's init_weights: every Linear trunc-normal(0.02)
            nn.init.trunc_normal_(self.lora_A, std=0.02)
            nn.init.trunc_normal_(self.lora_B, std=0.02)
        elif init == "paper":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            raise ValueError(f"method.init={init!r}; choose paper or noah")
        self.scale = float(alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, weight, bias):
        h = self.dropout(x) @ self.lora_A.t().to(x.dtype)
        return (h @ self.lora_B.t().to(x.dtype)) * self.scale

    def delta_weight(self, weight):
        return (self.lora_B @ self.lora_A) * self.scale


@register_method("lora")
class LoRA(Method):
    batched = "lora"

    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.1,
                 targets: Sequence[str] = ("qkv",), init: str = "paper"):
        if init not in ("paper", "noah"):
            raise ValueError(f"method.init={init!r}; choose paper or noah")
        self.init = init
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.targets = [targets] if isinstance(targets, str) else list(targets)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, lambda site: LoRADelta(
            site.out_features, site.in_features, self.rank, self.alpha, self.dropout, self.init))
