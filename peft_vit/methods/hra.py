"""HRA (Yuan, Liu and Xu, "Bridging The Gap between Low-rank and Orthogonal Adaptation via
Householder Reflection Adaptation", NeurIPS 2024; official code DaShenZi721/HRA; reference
implementation ``huggingface/peft``'s ``HRAConfig``): the frozen weight is multiplied by a chain
of r learnt Householder reflections acting on the input features::

    W' = W H_1 H_2 ⋯ H_r,   H_i = I − 2 u_i u_iᵀ / ‖u_i‖²,   u_i ∈ R^in

so ΔW = W' − W has rank ≤ r (the low-rank side of the paper's title) and W' keeps W's singular
values (the orthogonal side). With ``gram_schmidt`` (peft's ``apply_GS``) the u_i are first made
orthonormal and the chain is ``I − 2 U Uᵀ`` (computed here through a QR factorisation: U Uᵀ is
the same for any signs of the basis); it needs ``init: random`` (repeated vectors have no
orthonormal basis of r vectors).

Init (``init``): ``symmetric`` (the paper's, peft's default) draws r/2 vectors kaiming-uniform
(a = √5, on the (in, r/2) tensor, as peft) and repeats each one: u_{2i−1} = u_{2i}, H H = I, so
the model starts as the backbone exactly; it needs an even r. ``random``: all r drawn (not the
backbone at start).

The paper's orthogonality regulariser λ‖I − ÛᵀÛ‖²_F (Û: the u_i normalised) is not
implemented: the training loop has no hook for a method's loss term; this is the paper's λ = 0
setting, and peft has no regulariser either.

Defaults: HRA has no image-classification experiment (its tasks are GLUE, LLaMA-2 on
mathematical reasoning and Stable Diffusion); its language runs use r = 8 and 32. Here r = 10 on
the q and v blocks of timm's fused qkv, chosen so that HRA's budget equals HTA's default
(householder.yaml, 184,320): 24 matrices · 768 · 10 = 184,320 on ViT-B/16 (HTA's q, k, v, o
at one budget would need r = 5, odd, which the symmetric init cannot start from).

Mergeable exactly: W' is formed in every forward (ΔW = −(W U) T⁻¹ Uᵀ, the chain's compact WY
form; one matmul with W' over the tokens) and folds into the Linear. Numerically equal to peft's HRA given the same vectors
(tests/test_method_hra.py). All adapted Linears of one shape run together, the same math:
methods/batched/hra.py.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from ..precision import like
from .base import Delta, Method, Site, adapt_linears, register_method

INITS = ("symmetric", "random")


class HRADelta(Delta):
    def __init__(self, in_features: int, rank: int, init: str = "symmetric", gram_schmidt: bool = False):
        super().__init__()
        self.gram_schmidt = gram_schmidt
        if init == "symmetric":
            half = torch.empty(in_features, rank // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = half.repeat_interleave(2, dim=1)
        else:
            u = torch.empty(in_features, rank)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u)
        self.register_buffer("wy_mask", -(torch.ones(rank, rank).triu(1) + 0.5 * torch.eye(rank)), persistent=False)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        u = like(self.hra_u, weight.dtype)
        if self.gram_schmidt:
            q = torch.linalg.qr(u).Q
            return (weight @ q) @ (-2 * q.t())
        # H_1 ⋯ H_r = I − U T⁻¹ Uᵀ, T = the strict upper triangle of UᵀU plus half its diagonal
        # (the compact WY form; Joffrain, Low, Quintana-Ortí, van de Geijn and Van Zee,
        # "Accumulating Householder transformations, revisited", ACM TOMS 2006): the chain of r
        # reflections in a few ops, equal to peft's product of r reflections
        t = (u.t() @ u) * self.wy_mask  # −T (the mask carries the sign)
        return (weight @ u) @ torch.linalg.solve_triangular(t, u.t(), upper=True)


@register_method("hra")
class HRA(Method):
    batched = "hra"  # every adapted Linear of one shape at once: methods/batched/hra.py

    def __init__(self, rank: int = 10, targets: Sequence[str] = ("q", "v"), init: str = "symmetric",
                 gram_schmidt: bool = False):
        if int(rank) <= 0:
            raise ValueError(f"method.rank={rank}: HRA needs at least one reflection")
        if init not in INITS:
            raise ValueError(f"method.init={init!r}; choose one of {', '.join(INITS)}")
        if init == "symmetric" and int(rank) % 2:
            raise ValueError(f"method.rank={rank}: the symmetric init repeats each vector, so it needs an "
                             "even rank; choose an even rank or method.init=random")
        if gram_schmidt and init == "symmetric":
            raise ValueError("method.gram_schmidt=true orthonormalises the vectors, and the symmetric init repeats "
                             "each one (a rank-deficient basis); use method.init=random with it")
        self.rank, self.init, self.gram_schmidt = int(rank), init, bool(gram_schmidt)
        self.targets = [targets] if isinstance(targets, str) else list(targets)

    def _delta(self, site: Site) -> HRADelta:
        if self.rank > site.in_features:
            raise ValueError(f"{site.name}: rank {self.rank} exceeds its {site.in_features} input features")
        return HRADelta(site.in_features, self.rank, self.init, self.gram_schmidt)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, self._delta, weight_space=True)
