"""OFT (methods/oft.py) for every adapted Linear of one shape at once: the skew parameters of all
blocks and layers in one :class:`ParamPack`, the Cayley map of every b × b block of every
adapted matrix in one batched solve per forward; each Linear then rotates the inputs of all its
blocks in one blockwise product (identity blocks for unadapted rows) and runs one matmul with W'.

:class:`RotationBatched` also runs BOFT (methods/batched/boft.py): m rotation factors per matrix
with the butterfly gathers between them (two consecutive gathers composed into one index) and the
output scale."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..oft import OFTDelta, cayley
from . import BatchedDeltas, attach_batched, block_onehot, linear_units, ordered_deltas, pack_parameters


def block_dropout_each(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """oft.py's ``block_dropout`` for (M, m, D, b, b) blocks, each of the M matrices drawing its own
    int(p · D) identity positions (the same in its m factors), as one delta each would."""
    M, n = blocks.shape[0], blocks.shape[2]
    if p <= 0 or n == 1:
        return blocks
    picked = torch.rand(M, n, device=blocks.device).argsort(-1)[:, : int(p * n)]
    mask = torch.zeros(M, n, device=blocks.device, dtype=blocks.dtype).scatter_(1, picked, 1.0)[:, None, :, None, None]
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


class RotationBatched(BatchedDeltas):
    """``W' = s ⊙ W Mᵀ`` of fused Linears, ``M = P_m R_m P_mᵀ ⋯ P_1 R_1 P_1ᵀ`` per block (OFT:
    m = 1, P = I, no s), every block's R_i from one Cayley solve per unit and forward.

    ``units``: lists of Linears of one signature (:func:`linear_units`); ``name`` the skew
    parameter (``oft_r``: (D, b(b−1)/2); ``boft_r``: (m, D, b(b−1)/2)); ``gathers(delta)`` the
    column indices applied before factor i (``None``: none) and after the last (m + 1 entries);
    ``scale`` the name of the per-output scale, or ``None``."""

    def __init__(self, pack, units: List[List], name: str, factors: int, neumann_terms: int, dropout: float,
                 gathers: Optional[Callable[[nn.Module], Sequence[Optional[torch.Tensor]]]] = None,
                 scale: Optional[str] = None):
        super().__init__([lin for unit in units for lin in unit], packs=[pack])
        self.name, self.factors, self.neumann_terms, self.p, self.scale = name, factors, neumann_terms, dropout, scale
        self.gathers = []
        self.shapes = []
        for u, unit in enumerate(units):
            lin = unit[0]
            first = ordered_deltas(lin)[0]
            idx = list(gathers(first)) if gathers is not None else [None] * (factors + 1)
            for i, g in enumerate(idx):
                if g is not None:
                    self.register_buffer(f"gather_{u}_{i}", g, persistent=False)
            self.gathers.append([g is not None for g in idx])
            onehot, size = block_onehot(lin)
            G, NB = onehot.shape
            b = first.block_size
            whole = G == NB  # every row block adapted, in order (block_onehot sorts them)
            if not whole:
                self.register_buffer(f"onehot_{u}", onehot, persistent=False)
                free = (1 - onehot.sum(0))  # 1 where a row block is not adapted: identity rotation, scale 1
                eye = free[:, None, None, None, None] * torch.eye(b, device=onehot.device)
                self.register_buffer(f"eye_{u}", eye, persistent=False)
                self.register_buffer(f"ones_{u}", free[:, None].expand(NB, size).clone(), persistent=False)
            self.register_buffer(f"skew_map_{u}", first.skew_map, persistent=False)
            self.shapes.append((len(unit), G, NB, size, lin.in_features // b, b, whole))
        self.where = [u for u, unit in enumerate(units) for _ in unit]

    def compute(self):
        views = self.packs[0].unpack()
        out = []
        for u, (L, G, NB, size, D, b, whole) in enumerate(self.shapes):
            skew = (views[(u, self.name)].view(L * G * self.factors * D, -1) @ getattr(self, f"skew_map_{u}"))
            blocks = cayley(skew.view(L * G, self.factors, D, b, b), self.neumann_terms)
            if self.training:
                blocks = block_dropout_each(blocks, self.p)
            blocks = blocks.view(L, G, self.factors, D, b, b)
            s = views[(u, self.scale)].view(L, G, size) if self.scale else None
            if not whole:  # on every row block: the adapted blocks' rotations, the identity elsewhere
                onehot = getattr(self, f"onehot_{u}")
                blocks = torch.einsum("gk,lgmdij->lkmdij", onehot, blocks) + getattr(self, f"eye_{u}")
                if s is not None:
                    s = torch.einsum("gk,lgs->lks", onehot, s) + getattr(self, f"ones_{u}")
            blocks, s = self.cast(blocks, s)
            blocks = blocks.view(L, NB, self.factors, D, b, b).unbind(0)
            out.extend(zip(blocks, s.reshape(L, NB * size, 1).unbind(0)) if s is not None
                       else ((r, None) for r in blocks))
        return out

    def forward_linear(self, lin, index, x):
        blocks, s = self._cache[index]
        u = self.where[index]
        w = lin.base.weight
        if w.dtype != blocks.dtype:
            blocks, s = blocks.to(w.dtype), (None if s is None else s.to(w.dtype))
        NB, m, D, b = blocks.shape[:4]
        for i in range(m):
            if self.gathers[u][i]:
                w = w.index_select(1, getattr(self, f"gather_{u}_{i}"))
            # oft.py's rotate_inputs on every row block at once: W'[k, o, d, c] = Σ_j W[k, o, d, j] R_k[d, c, j]
            w = torch.einsum("kodj,kdcj->kodc", w.view(NB, -1, D, b), blocks[:, i]).reshape(lin.out_features, -1)
        if self.gathers[u][m]:
            w = w.index_select(1, getattr(self, f"gather_{u}_{m}"))
        return F.linear(x, w if s is None else w * s, lin.base.bias)


def apply(model: nn.Module, method) -> None:
    units = linear_units(model, OFTDelta)
    if units:
        pack = pack_parameters(model, [[d for lin in unit for d in ordered_deltas(lin)] for unit in units],
                               name="oft_pack")
        attach_batched(model, "oft_batched",
                       RotationBatched(pack, units, "oft_r", 1, method.neumann_terms, method.dropout))
