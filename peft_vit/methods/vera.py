"""VeRA (Kopiczko, Blankevoort & Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024;
reference implementation: HF ``peft``'s ``VeraConfig``/``VeraModel``, the paper's released code).

One pair of frozen random matrices ``A`` (r × in_max) and ``B`` (out_max × r) is shared by every
adapted matrix; each adapted matrix trains only two scaling vectors::

    ΔW = Λ_b B[:out] Λ_d A[:, :in],    Λ_d = diag(d) (d ∈ R^r),  Λ_b = diag(b) (b ∈ R^out)

``A`` and ``B`` are sized for the largest adapted input and output and sliced per matrix (as HF
``peft`` does); both are kaiming-uniform from a ``torch.Generator`` seeded with
``projection_seed`` (independent of the global RNG; the same draws as HF ``peft`` with
``projection_prng_key`` = seed), held as persistent buffers, so a run's state dict carries them.
Init: ``d = d_initial`` (0.1), ``b = 0``: the model starts as the backbone.

Defaults (the paper's image-classification setting with ViTs): the query and value projections
(the q and v blocks of timm's fused qkv), rank 256: the paper's count L_tuned · (d_model + r),
12 · 2 · (768 + 256) = 24,576 on ViT-B/16 without the head (24.6K in its ViT-B rows). The paper's
learning rates for the vectors and the head are the optim config's business here. Numerically identical to HF ``peft``'s VeRA
with the same seed and vectors (tested).

The forward never forms ΔW: per adapted Linear ``y = x Wᵀ + c + dropout(x) A_inᵀ M`` where
``M`` (r × out) holds every adapted block's ``Λ_d B_sᵀ Λ_b`` on its rows (zero elsewhere); the
M of all layers of one kind are computed at once per forward (methods/batched/vera.py). With ``dropout`` > 0 the blocks of one fused Linear (q, v) share one dropout mask
on x (HF ``peft`` adapts whole modules, one mask each). Works on every family; on Swin the stages'
widths differ and each slices what it needs from the shared A, B.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Delta, Mergeable, Method, adapt_linears, register_method


def kaiming_uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """U(±√(6 / fan_in)), fan_in = shape[1] (kaiming-uniform, gain √2), drawn from ``generator``."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeRADelta(Delta):
    def __init__(self, out_features: int, in_features: int, rank: int, d_initial: float, dropout: float):
        super().__init__()
        self.vera_d = nn.Parameter(torch.full((rank,), float(d_initial)))
        self.vera_b = nn.Parameter(torch.zeros(out_features))
        self.in_features, self.out_features = in_features, out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.__dict__["shared"] = None  # the VeRAProjections holding A and B (model.vera; set by VeRA.inject)

    def projections(self):
        return self.shared.vera_A[:, :self.in_features], self.shared.vera_B[:self.out_features]

    def forward(self, x, weight, bias):
        a, b = self.projections()
        h = F.linear(self.dropout(x), a.to(x.dtype)) * self.vera_d.to(x.dtype)
        return F.linear(h, b.to(x.dtype)) * self.vera_b.to(x.dtype)

    def delta_weight(self, weight):
        a, b = self.projections()
        return (self.vera_b[:, None] * b) @ (self.vera_d[:, None] * a)


class VeRAProjections(Mergeable, nn.Module):
    """The shared frozen ``A`` (r × in_max) and ``B`` (out_max × r), persistent buffers:
    ``model.vera``. Merging folds them into every adapted Linear, then removes them."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", a)
        self.register_buffer("vera_B", b)

    def merge(self) -> None:
        return None


@register_method("vera")
class VeRA(Method):
    batched = "vera"  # the M of every Linear of one kind in one einsum: methods/batched/vera.py

    def __init__(self, rank: int = 256, d_initial: float = 0.1, dropout: float = 0.0,
                 targets: Sequence[str] = ("q", "v"), projection_seed: int = 0):
        if rank <= 0:
            raise ValueError(f"vera: rank must be positive, not {rank}")
        self.rank, self.d_initial, self.dropout = int(rank), float(d_initial), float(dropout)
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.projection_seed = int(projection_seed)

    def inject(self, model: nn.Module) -> None:
        deltas: List[VeRADelta] = []

        def make(site):
            deltas.append(VeRADelta(site.out_features, site.in_features, self.rank, self.d_initial, self.dropout))
            return deltas[-1]

        adapt_linears(model, self.targets, make)
        g = torch.Generator(device="cpu").manual_seed(self.projection_seed)
        a = kaiming_uniform((self.rank, max(d.in_features for d in deltas)), g)  # A first, as HF peft
        b = kaiming_uniform((max(d.out_features for d in deltas), self.rank), g)
        device = deltas[0].vera_b.device
        model.add_module("vera", VeRAProjections(a.to(device), b.to(device)))
        for d in deltas:
            d.__dict__["shared"] = model.vera
