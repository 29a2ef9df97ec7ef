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
M of all layers of one kind are computed at once per forward (:class:`VeRABatched`, which also
owns A and B). With ``dropout`` > 0 the blocks of one fused Linear (q, v) share one dropout mask
on x (HF ``peft`` adapts whole modules, one mask each). Works on every family; on Swin the stages'
widths differ and each slices what it needs from the shared A, B.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import (AdaptedLinear, BatchedDeltas, Delta, Method, adapt_linears, attach_batched, block_onehot,
                   low_rank_output, register_method)


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
        self.__dict__["shared"] = None  # the VeRABatched holding A and B (set by VeRA.inject)

    def projections(self):
        return self.shared.vera_A[:, :self.in_features], self.shared.vera_B[:self.out_features]

    def forward(self, x, weight, bias):
        a, b = self.projections()
        h = F.linear(self.dropout(x), a.to(x.dtype)) * self.vera_d.to(x.dtype)
        return F.linear(h, b.to(x.dtype)) * self.vera_b.to(x.dtype)

    def delta_weight(self, weight):
        a, b = self.projections()
        return (self.vera_b[:, None] * b) @ (self.vera_d[:, None] * a)


class VeRABatched(BatchedDeltas):
    """Owns the shared frozen A, B; per forward, builds the M of every adapted Linear of one kind
    (e.g. every ``attn.qkv`` with q and v adapted) for all layers in one einsum."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, units: List[List[AdaptedLinear]]):
        super().__init__([lin for unit in units for lin in unit])
        self.register_buffer("vera_A", a)
        self.register_buffer("vera_B", b)
        self.__dict__["units"] = units  # plain references: the Linears are in the model already
        for u, unit in enumerate(units):
            self.register_buffer(f"onehot_{u}", block_onehot(unit[0])[0], persistent=False)

    def compute(self):
        out = []
        for u, unit in enumerate(self.units):
            keys = sorted(unit[0].deltas, key=lambda k: unit[0].slices[k][0])
            first = unit[0].deltas[keys[0]]
            deltas = [lin.deltas[k] for lin in unit for k in keys]
            L, G = len(unit), len(keys)
            d = torch.stack([x.vera_d for x in deltas]).view(L, G, -1)
            b = torch.stack([x.vera_b for x in deltas]).view(L, G, -1)
            a_in, b_out = first.projections()
            m = torch.einsum("lgi,oi,lgo,gn->lino", d, b_out, b, getattr(self, f"onehot_{u}")).reshape(L, d.shape[-1], -1)
            out.extend((a_in.t(), mi, first.dropout) for mi in m.unbind(0))
        return out

    def forward_linear(self, lin, index, x):
        a_t, m, dropout = self._cache[index]
        return low_rank_output(lin, x, a_t, m, input_dropout=dropout)


@register_method("vera")
class VeRA(Method):
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
        kinds: Dict[tuple, List[AdaptedLinear]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, AdaptedLinear) and all(isinstance(d, VeRADelta) for d in mod.deltas.values()):
                kinds.setdefault((name.rsplit(".", 1)[-1], tuple(sorted(mod.slices.items())),
                                  tuple(mod.base.weight.shape)), []).append(mod)
        device = deltas[0].vera_b.device
        shared = attach_batched(model, "vera", VeRABatched(a.to(device), b.to(device), list(kinds.values())))
        for d in deltas:
            d.__dict__["shared"] = shared
