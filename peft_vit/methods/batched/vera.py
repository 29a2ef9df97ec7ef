"""VeRA (methods/vera.py): per forward, the M of every adapted Linear of one kind (e.g. every
``attn.qkv`` with q and v adapted) for all layers in one einsum."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..vera import VeRADelta
from ..wrappers import AdaptedLinear
from . import BatchedDeltas, attach_batched, block_onehot, linear_units, low_rank_output, ordered_deltas


class VeRABatched(BatchedDeltas):
    """Per forward, the M of every adapted Linear of one kind for all layers in one einsum."""

    def __init__(self, units: List[List[AdaptedLinear]]):
        super().__init__([lin for unit in units for lin in unit])
        self.__dict__["units"] = units  # plain references: the Linears are in the model already
        for u, unit in enumerate(units):
            self.register_buffer(f"onehot_{u}", block_onehot(unit[0])[0], persistent=False)

    def compute(self):
        out = []
        for u, unit in enumerate(self.units):
            deltas = [d for lin in unit for d in ordered_deltas(lin)]
            first = deltas[0]
            L, G = len(unit), len(unit[0].deltas)
            d = torch.stack([x.vera_d for x in deltas]).view(L, G, -1)
            b = torch.stack([x.vera_b for x in deltas]).view(L, G, -1)
            a_in, b_out = first.projections()
            m = torch.einsum("lgi,oi,lgo,gn->lino", d, b_out, b, getattr(self, f"onehot_{u}")).reshape(L, d.shape[-1], -1)
            a_t, m = self.cast(a_in.t(), m)
            out.extend((a_t, mi, first.dropout) for mi in m.unbind(0))
        return out

    def forward_linear(self, lin, index, x):
        a_t, m, dropout = self._cache[index]
        return low_rank_output(lin, x, a_t, m, input_dropout=dropout)


def apply(model: nn.Module, method) -> None:
    attach_batched(model, "vera_batched", VeRABatched(linear_units(model, VeRADelta)))
