"""FacT-TT (methods/fact_tt.py): the cores of every adapted Linear of every layer in one
:class:`ParamPack` tensor, and per forward the U side of all of them in one matmul: each Linear's
``Qᵀ = Σ blockdiag(U)`` ((pieces·r) × in) is a row range of ``cores · U``, the cores viewed as
rows of r. Each Linear then runs ``y = x Wᵀ + b + dropout(x Q) R`` in one ``addmm``, with
``R = s · V``\\ ᵀ on each adapted output piece (block-diagonal for qkv and fc1; for a Linear with
some blocks unadapted, zero on those), the R of a kind the same for every layer.

The same math as the per-layer forward (``U``, then the core, dropout, ``V``) with the products
associated differently; dropout masks the same (pieces·r) intermediate. With qkv adapted as
blocks (``targets: [q, k, v, …]``) one dropout call covers the three blocks (each entry masked
independently, as three calls do, but from other random draws)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..fact_tt import FacTTTDelta
from ..wrappers import AdaptedLinear
from . import BatchedDeltas, attach_batched, linear_units, low_rank_output, ordered_deltas, pack_parameters


class FacTTTBatched(BatchedDeltas):
    def __init__(self, pack, units: List[List[AdaptedLinear]]):
        super().__init__([lin for unit in units for lin in unit])  # reads its pack whole: no split
        first = ordered_deltas(units[0][0])[0]
        self.__dict__["pack"] = pack  # plain references: the model owns them
        self.__dict__["factors"] = first.factors
        self.scale = first.scale
        dim = first.factors.u.shape[1]
        self.shapes, self.rows, self.pattern, self.count = [], [], [], {}
        for unit in units:
            lin, deltas = unit[0], ordered_deltas(unit[0])
            keys = sorted(lin.deltas, key=lambda k: lin.slices[k][0])
            # R's row pieces (in Q's column order) and the output piece each one fills
            slots = tuple(lin.slices[k][0] // dim + j for k in keys for j in range(lin.deltas[k].p_out))
            pattern = (slots, lin.out_features // dim)
            if pattern not in self.count and slots != tuple(range(pattern[1])):
                onehot = torch.zeros(len(slots), 1, pattern[1], 1, device=lin.base.weight.device)
                onehot[torch.arange(len(slots)), 0, torch.tensor(slots), 0] = 1.0
                self.register_buffer(f"onehot_{len(self.count)}", onehot, persistent=False)
            self.count.setdefault(pattern, 0)
            self.count[pattern] += len(unit)
            self.pattern.append(pattern)
            width = sum(d.p_out for d in deltas) * first.factors.u.shape[0]
            self.shapes.append((len(unit), width, deltas[0].p_in * dim, deltas[0].dropout))
            self.rows.append(len(unit) * width * deltas[0].p_in)

    def right(self, pattern, vt: torch.Tensor, index: int) -> torch.Tensor:
        """R (pieces·r, out): ``vt`` on the diagonal piece of each adapted output piece."""
        slots, n = pattern
        if slots == tuple(range(n)):
            return vt if n == 1 else torch.block_diag(*[vt] * n)
        r, dim = vt.shape
        return (getattr(self, f"onehot_{index}") * vt[None, :, None]).reshape(len(slots) * r, n * dim)

    def compute(self):
        u, v = self.factors.u, self.factors.v
        # every Linear's Qᵀ in one matmul; under autocast formed in fp32, cast once (BatchedDeltas.cast)
        qt = self.cast(self.pack.core.view(-1, u.shape[0]) @ u)[0].split(self.rows)
        vt = v.t() if self.scale == 1.0 else v.t() * self.scale
        # one R per pattern, one view per Linear: backward gathers their gradients in one op
        rights: Dict[tuple, object] = {}
        for i, (pattern, count) in enumerate(self.count.items()):
            r = self.cast(self.right(pattern, vt, i))[0]  # one cast per pattern, not per Linear
            rights[pattern] = iter(r.expand(count, *r.shape).unbind(0))
        out = []
        for (L, width, n_in, dropout), q, pattern in zip(self.shapes, qt, self.pattern):
            out.extend((qi, next(rights[pattern]), dropout) for qi in q.view(L, width, n_in).transpose(1, 2).unbind(0))
        return out

    def forward_linear(self, lin, index, x):
        q, r, dropout = self._cache[index]
        return low_rank_output(lin, x, q, r, inner_dropout=dropout)


def apply(model: nn.Module, method) -> None:
    units = linear_units(model, FacTTTDelta)
    if units:
        pack = pack_parameters(model, [[d for lin in unit for d in ordered_deltas(lin)] for unit in units],
                               name="fact_tt_pack")
        attach_batched(model, "fact_tt_batched", FacTTTBatched(pack, units))
