"""RepAdapter (methods/repadapter.py): every adapter's parameters in two flat tensors (1-d and
matrices, as methods/batched/flat.py), and per forward the dense block-diagonal W_B of every
adapter of one shape in one copy into zeros, instead of a chunk and a block_diag per adapter.
Each adapter then reads its W_A, b_A, W_B, b_B from that (``RepAdapter.served_by``): the same
tensors, values and products as its own path."""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

from ..repadapter import RepAdapter
from . import BatchedDeltas, attach_batched, pack_parameters


class RepAdapterBatched(BatchedDeltas):
    cast_packs = True  # under autocast the pack is cast once per step, before W_B is formed (issue 22)

    def __init__(self, pack, groups: List[List[RepAdapter]]):
        super().__init__(packs=[pack])
        self.shapes = []
        for g, adapters in enumerate(groups):
            first = adapters[0]
            h, dim = first.down.weight.shape
            self.shapes.append((len(adapters), first.groups, dim, h))
            for i, a in enumerate(adapters):
                a.served_by = (self, (g, i))

    def compute(self):
        views = self.packs[0].unpack()
        out = []
        for g, (n, groups, dim, h) in enumerate(self.shapes):  # units 2g: the adapters, 2g + 1: their down
            up = views[(2 * g, "up_weight")].view(n, groups, dim // groups, h // groups)
            dense = up.new_zeros(n, groups, dim // groups, groups, h // groups)
            dense.diagonal(0, 1, 3).copy_(up.permute(0, 2, 3, 1))  # torch.block_diag of each adapter's chunks
            out.append(list(zip(views[(2 * g + 1, "weight")].view(n, h, dim).unbind(0),
                                views[(2 * g + 1, "bias")].view(n, h).unbind(0),
                                dense.view(n, dim, h).unbind(0),
                                views[(2 * g, "up_bias")].view(n, dim).unbind(0))))
        return out

    def weights(self, where):
        g, i = where
        return self._cache[g][i]


def apply(model: nn.Module, method) -> None:
    groups: Dict[tuple, List[RepAdapter]] = {}
    for m in model.modules():
        if isinstance(m, RepAdapter):
            groups.setdefault((m.groups, tuple(m.down.weight.shape)), []).append(m)
    if groups:
        units = [unit for adapters in groups.values() for unit in (adapters, [a.down for a in adapters])]
        pack = pack_parameters(model, units, name="repadapter_pack", label="repadapter")
        attach_batched(model, "repadapter_batched", RepAdapterBatched(pack, list(groups.values())))
