"""VeRA (methods/vera.py): per forward, the M of every adapted Linear of one kind (e.g. every
``attn.qkv`` with q and v adapted) for all layers in one einsum."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..vera import VeRADelta
from ..wrappers import AdaptedLinear
from . import BatchedDeltas, attach_batched, block_onehot, low_rank_output


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
            keys = sorted(unit[0].deltas, key=lambda k: unit[0].slices[k][0])
            first = unit[0].deltas[keys[0]]
            deltas = [lin.deltas[k] for lin in unit for k in keys]
            L, G = len(unit), len(keys)
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
    kinds: Dict[tuple, List[AdaptedLinear]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear) and all(isinstance(d, VeRADelta) for d in mod.deltas.values()):
            kinds.setdefault((name.rsplit(".", 1)[-1], tuple(sorted(mod.slices.items())),
                              tuple(mod.base.weight.shape)), []).append(mod)
    attach_batched(model, "vera_batched", VeRABatched(list(kinds.values())))
