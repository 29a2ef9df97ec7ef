"""LoRA as run for the VTAB tables (NOAH's code), SPEC §2.2.

``W' = W + scale · B A`` in parallel with the frozen Linear, ``scale = alpha / rank``:
A (rank × in) kaiming-uniform(a=√5), B (out × rank) zeros, dropout on the LoRA input only.
Defaults: the fused ``qkv`` as ONE matrix (A 8×768, B 2304×8), rank 8, alpha 8 (scale 1, NOAH
applies no α/r scaling), dropout 0.1: 294,912 parameters on ViT-B/16. ``targets=[q, v]`` adapts
the q and v blocks of the fused projection separately (same count at rank 8).

Numerically identical to ``huggingface/peft``'s LoRA with the same A and B (tested).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .base import Delta, Method, adapt_linears, register_method


class LoRADelta(Delta):
    def __init__(self, out_features: int, in_features: int, rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError("LoRA rank must be positive")
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = float(alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, weight, bias):
        h = self.dropout(x) @ self.lora_A.t().to(x.dtype)
        return (h @ self.lora_B.t().to(x.dtype)) * self.scale

    def delta_weight(self, weight):
        return (self.lora_B @ self.lora_A) * self.scale


@register_method("lora")
class LoRA(Method):
    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.1,
                 targets: Sequence[str] = ("qkv",)):
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.targets = [targets] if isinstance(targets, str) else list(targets)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, lambda name, block, out, inp, layer: LoRADelta(
            out, inp, self.rank, self.alpha, self.dropout))
