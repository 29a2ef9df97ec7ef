"""HRA (methods/hra.py) for every adapted Linear of one shape at once: the vectors of all blocks
and layers in one :class:`ParamPack`, the factors of ``ΔW = (W U) S`` (``S = −T⁻¹ Uᵀ`` of the
compact WY form, or ``−2 Qᵀ`` with ``gram_schmidt``) of all of them in one batched solve (or QR)
per forward; each Linear then forms ``W' = W + ((W U_all) ⊙ mask) S_all`` of all its blocks in
one ``addmm`` (``U_all``: its blocks' vectors side by side; ``mask``: block g's rows keep block
g's columns, unadapted rows none) and runs one matmul with W'."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..hra import HRADelta
from . import BatchedDeltas, attach_batched, block_onehot, linear_units, ordered_deltas, pack_parameters


class HRABatched(BatchedDeltas):
    def __init__(self, pack, units: List[List], gram_schmidt: bool):
        super().__init__([lin for unit in units for lin in unit], packs=[pack])
        self.gram_schmidt = gram_schmidt
        self.shapes = []
        for u, unit in enumerate(units):
            lin = unit[0]
            first = ordered_deltas(lin)[0]
            n_in, r = first.hra_u.shape
            onehot, size = block_onehot(lin)
            whole = tuple(onehot.shape) == (1, 1)
            if not whole:  # (out, G·r): row block k keeps the columns of the delta adapting it
                mask = onehot.t().repeat_interleave(size, 0).repeat_interleave(r, 1)
                self.register_buffer(f"mask_{u}", mask, persistent=False)
            self.register_buffer(f"wy_mask_{u}", first.wy_mask, persistent=False)
            self.shapes.append((len(unit), onehot.shape[0], n_in, r, whole))
        self.where = [u for u, unit in enumerate(units) for _ in unit]

    def compute(self):
        views = self.packs[0].unpack()
        out = []
        for u, (L, G, n_in, r, _) in enumerate(self.shapes):
            vecs = views[(u, "hra_u")].view(L * G, n_in, r)
            if self.gram_schmidt:
                vecs = torch.linalg.qr(vecs).Q
                right = -2 * vecs.mT
            else:  # HRADelta.delta_weight for all blocks: −T⁻¹ Uᵀ, −T the masked Gram matrix
                right = torch.linalg.solve_triangular(vecs.mT @ vecs * getattr(self, f"wy_mask_{u}"), vecs.mT,
                                                      upper=True)
            left = vecs.view(L, G, n_in, r).permute(0, 2, 1, 3).reshape(L, n_in, G * r)
            left, right = self.cast(left, right.reshape(L, G * r, n_in))
            out.extend(zip(left.unbind(0), right.unbind(0)))
        return out

    def forward_linear(self, lin, index, x):
        left, right = self._cache[index]
        u = self.where[index]
        w = lin.base.weight
        if w.dtype != left.dtype:
            left, right = left.to(w.dtype), right.to(w.dtype)
        wu = w @ left
        if not self.shapes[u][-1]:
            wu = wu * getattr(self, f"mask_{u}")
        return F.linear(x, torch.addmm(w, wu, right), lin.base.bias)


def apply(model: nn.Module, method) -> None:
    units = linear_units(model, HRADelta)
    if units:
        pack = pack_parameters(model, [[d for lin in unit for d in ordered_deltas(lin)] for unit in units],
                               name="hra_pack")
        attach_batched(model, "hra_batched", HRABatched(pack, units, method.gram_schmidt))
