"""DoRA (Liu, Wang, Yin, Molchanov, Wang, Cheng and Chen, "DoRA: Weight-Decomposed Low-Rank
Adaptation", ICML 2024; official code NVlabs/DoRA): a frozen weight is split into a magnitude and
a direction; LoRA updates the direction, the magnitude trains on its own::

    W' = m ⊙ V / ‖V‖,   V = W + s · B A,   s = alpha / rank

‖V‖ is the L2 norm of each row of the (out, in) weight, i.e. one norm per output unit. The paper
calls it the "column-wise" norm of its d×k matrices, which leaves the orientation to the reader;
the official code and ``huggingface/peft`` both take ``norm(dim=1)`` of the (out, in) weight, and
so does this file. m (one value per output unit) starts at ‖W‖, B at zero and A kaiming-uniform
(a=√5), so W' = W at start, exactly.

The norm is a constant in backward (``detach_norm``, default true): the paper's memory-saving
trick (its section 4.3), which the official code runs by default (``dora_simple=True`` in
commonsense_reasoning/peft/src/peft/tuners/dora.py) and ``huggingface/peft`` always does. The
forward value is the same either way; ``detach_norm: false`` gives the full gradient.

Dropout is on the input of the update only, as in the official code: the update's output
``Dropout(x) · (m/‖V‖ ⊙ V − W)ᵀ`` is added to the frozen ``x Wᵀ + b`` (the bias is not rescaled).
With ``dropout: 0`` the layer instead runs one matmul with W' (``weight_space``).

Defaults (the paper has no VTAB-1k experiment; these follow this project's LoRA so the two compare
directly): the fused ``qkv`` as one matrix, rank 8, alpha 8 (s = 1), dropout 0.1.
Count on ViT-B/16: LoRA's 12 · (8·768 + 2304·8) = 294,912 plus the magnitudes 12 · 2,304 =
27,648: 322,560. ``targets=[q, v]`` adapts the q and v blocks separately (their rows' norms).

Mergeable exactly: ΔW = m/‖V‖ ⊙ V − W. Numerically identical to ``huggingface/peft``'s LoRA with
``use_dora=True`` given the same A, B and m (tested).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Delta, Method, Site, adapt_linears, register_method


class DoRADelta(Delta):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, dropout: float, detach_norm: bool):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"DoRA rank={rank}; it must be positive")
        out_features, in_features = weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.magnitude = nn.Parameter(torch.linalg.vector_norm(weight.detach().float(), dim=1))
        self.scale = float(alpha) / rank
        self.detach_norm = detach_norm
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        v = weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        if self.detach_norm:
            norm = norm.detach()
        return (self.magnitude.to(v.dtype)[:, None] / norm) * v - weight

    def forward(self, x, weight, bias):
        return F.linear(self.dropout(x), self.delta_weight(weight).to(x.dtype))


@register_method("dora")
class DoRA(Method):
    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.1,
                 targets: Sequence[str] = ("qkv",), detach_norm: bool = True):
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.detach_norm = bool(detach_norm)

    def _delta(self, site: Site) -> DoRADelta:
        return DoRADelta(site.weight, self.rank, self.alpha, self.dropout, self.detach_norm)

    def inject(self, model: nn.Module) -> None:
        # without dropout, W' in one matmul; with it, the update on the dropped-out input
        adapt_linears(model, self.targets, self._delta, weight_space=self.dropout == 0)
