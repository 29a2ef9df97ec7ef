"""FacT-TT (Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer",
AAAI 2023; official code JieShibo/PETL-ViT, ``FacT/fact_tt.py``): the increments of all adapted
matrices, cut into D×D pieces, form one (pieces, D, D) tensor factorised in Tensor-Train format:
``U`` (r×D, input side) and ``V`` (D×r, output side) shared by every layer, and a small core per
Linear of each layer::

    ΔW = s · blockdiag(V) Σ blockdiag(U)      (Σ: the Linear's core, (p_out·r)×(p_in·r))

q, k, v and o have an r×r core each; fc1 (4D×D) an 4r×r core whose output splits into four
r-blocks, each through V; fc2 (D×4D) an r×4r core reading U applied to each of its four D-wide
input blocks (the official ``fc1_FacTs`` / ``fc2_FacTs``). Dropout 0.1 on the r-dim intermediate
after the core. The delta is FacT-TK's (fact_tk.py's :class:`FacTDelta`: ΔW for merging from the
same ``Q = blockdiag(Uᵀ) Σᵀ``, ``R = s · blockdiag(Vᵀ)``) with the core read from its own parameter
instead of the shared Tucker core; its forward applies U, Σ and V in turn, as the official code.
In the model's forward the batched plan (methods/batched/fact_tt.py) serves every adapted Linear
instead: the Q of all of them from one matmul of all cores (one packed tensor) with U, then
``x Wᵀ + b + dropout(x Q) R`` in one ``addmm`` per Linear: the same math, products associated
differently (tested against this forward). A training step costs 1.09× full fine-tuning's ops
(1.92× per layer; ``scripts/benchmark.py --ops``): like FacT-TK, each adapted Linear keeps its
own low-rank path, since the dropout acts on the intermediate after the core.

Init (official): U as ``nn.Linear(D, r)``'s default (kaiming-uniform, a=√5), V zeros (so the model
starts as the backbone), each core as ``nn.Linear``'s default. The shared U, V are registered
once, in the first adapted Linear's delta (``blocks.0.attn.qkv.deltas.all.shared``). A stacked
qkv core (3r×r) draws each entry as the three official r×r cores do (fan-in r).

Choices from the official code where the paper is silent:

* ``rank`` and ``scale`` per task in the official configs (``FacT/configs/tt/*.yaml``): rank 8 or
  16 (4 for Clevr-dist); s 1 on 7 of the 19 VTAB tasks (the default here), 10 on 6, 100 on 4,
  0.1 on Resisc45, 0.01 on DTD. Default rank 8 (the unified study's, OSU-MLB/ViT_PEFT_Vision
  ``--fact_dim``; it searches rank {8, 16, 32} and s {0.01 … 100}).
* the fused ``attn.qkv`` (default target ``qkv``) is one Linear of three output pieces with the
  core Σ = [Σ_q; Σ_k; Σ_v] (3r×r): the official three paths (``q_FacTs``, ``k_FacTs``,
  ``v_FacTs``, each with its dropout) are exactly these rows, and one dropout over the 3r-vector
  masks each entry independently as three calls do. ``targets: [q, k, v, …]`` adapts the blocks
  separately instead (same math and count; ``[q, v]`` leaves k out); the batched plan then drops
  out the blocks' intermediates in one call too (other random draws than three calls, the same
  distribution).
* Swin: one D-wide U, V across all layers needs one width; Swin's grows per stage, so it raises
  :class:`~peft_vit.methods.base.UnsupportedBackboneError` (the official code handles ViT only).

ViT-B/16 (rank 8): U 6,144 + V 6,144 + per block q, k, v, o 4 · 64 + fc1 256 + fc2 256 = 768,
· 12 = 9,216 → 21,504 without the head (rank 16: 61,440).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..precision import matmul_operand
from .base import Method, PeftModule, adapt_linears, register_method
from .fact_tk import FacTDelta, single_width

TARGETS = ("qkv", "q", "k", "v", "o", "fc1", "fc2")


class SharedUV(PeftModule):
    """U (r, D) and V (D, r), shared by every core."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.u = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))  # nn.Linear(dim, rank)'s default
        self.v = nn.Parameter(torch.zeros(dim, rank))


class FacTTTDelta(FacTDelta):
    """One adapted Linear (or block of qkv) with its own core Σ, (p_out·r, p_in·r)."""

    def __init__(self, factors: SharedUV, p_in: int, p_out: int, scale: float, dropout: float):
        super().__init__(factors, 0, p_in, p_out, False, scale, dropout)
        rank = factors.u.shape[0]
        self.core = nn.Parameter(torch.empty(p_out * rank, p_in * rank))
        nn.init.kaiming_uniform_(self.core, a=math.sqrt(5))  # nn.Linear(p_in·r, p_out·r)'s default

    def qr(self):
        return self.q_from(self.core.t()), self.r_mat()

    def forward(self, x, weight, bias):
        """``s · V(Dropout(Σ U(x)))`` per piece, without forming Q and R (the official order)."""
        # under autocast the shared U, V are cast once per forward, not once per layer (precision.py)
        u, core, v = (matmul_operand(t, x) for t in (self.factors.u, self.core, self.factors.v))
        h = F.linear(x if self.p_in == 1 else x.unflatten(-1, (self.p_in, -1)), u)
        z = self.dropout(F.linear(h if self.p_in == 1 else h.flatten(-2), core))
        out = F.linear(z if self.p_out == 1 else z.unflatten(-1, (self.p_out, -1)), v)
        out = out if self.p_out == 1 else out.flatten(-2)
        return out if self.scale == 1.0 else out * self.scale


@register_method("fact_tt")
class FacTTT(Method):
    batched = "fact_tt"  # every core's U side in one matmul, one addmm per Linear: methods/batched/fact_tt.py

    def __init__(self, rank: int = 8, scale: float = 1.0, dropout: float = 0.1, targets: Sequence[str] = ("qkv", "o", "fc1", "fc2")):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"fact_tt: targets {bad} not supported; choose among {list(TARGETS)}")
        self.rank, self.scale, self.dropout = int(rank), float(scale), float(dropout)

    def inject(self, model: nn.Module) -> None:
        dim = single_width(model, "fact_tt (FacT-TT)")
        factors = SharedUV(dim, self.rank)

        def make(site):
            if site.in_features % dim or site.out_features % dim:
                raise ValueError(f"fact_tt: {site.name} ({site.out_features}×{site.in_features}) does not split "
                                 f"into {dim}×{dim} pieces")
            d = FacTTTDelta(factors, site.in_features // dim, site.out_features // dim, self.scale, self.dropout)
            if not made:
                d.shared = factors  # registered once; every delta reads it through its plain reference
            made.append(d)
            return d

        made: list = []
        adapt_linears(model, self.targets, make)
