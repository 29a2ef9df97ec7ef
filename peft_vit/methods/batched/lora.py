"""LoRA (methods/lora.py) with several blocks of one fused projection (``targets=[q, v]``): the A
and B of all layers live in one :class:`ParamPack` and each projection runs its blocks together:
one input-side matmul with the blocks' A side by side, one block-diagonal output matmul (zero for
unadapted blocks)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..wrappers import AdaptedLinear
from . import BatchedDeltas, attach_batched, block_onehot, pack_parameters


class LoRABatched(BatchedDeltas):
    """The LoRA blocks of fused projections (q and v of every ``attn.qkv``), all layers at once."""

    def __init__(self, pack, units: List[List[AdaptedLinear]], dropout: float):
        super().__init__([lin for unit in units for lin in unit], packs=[pack])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # one mask per block, as before
        self.shapes = []
        for u, unit in enumerate(units):
            lin = unit[0]
            keys = sorted(lin.deltas, key=lambda k: lin.slices[k][0])
            onehot, size = block_onehot(lin)
            self.register_buffer(f"onehot_{u}", onehot[:, None, :, None], persistent=False)
            first = lin.deltas[keys[0]]
            self.shapes.append((len(unit), len(keys), first.lora_A.shape[0], lin.in_features, size, first.scale))
        self.where = [u for u, unit in enumerate(units) for _ in unit]

    def compute(self):
        views = self.packs[0].unpack()
        out = []
        for u, (L, G, r, n_in, size, scale) in enumerate(self.shapes):
            a = views[(u, "lora_A")].view(L, G, r, n_in)
            b = views[(u, "lora_B")].view(L, G, size, r).transpose(-1, -2)           # (L, G, r, out)
            a = a.permute(0, 3, 1, 2).reshape(L, n_in, G * r) if self.dropout is None else a.transpose(-1, -2)
            onehot = getattr(self, f"onehot_{u}")
            b = (b.unsqueeze(3) * (onehot * scale if scale != 1.0 else onehot)).reshape(L, G * r, -1)
            a, b = self.cast(a, b)
            out.extend(zip(a.unbind(0), b.unbind(0)))
        return out

    def forward_linear(self, lin, index, x):
        a, b = self._cache[index]
        if x.dtype != a.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        if self.dropout is None:
            h = x2 @ a
        else:  # (G, N, in) @ (G, in, r): each block's own dropout mask
            h = torch.bmm(self.dropout(x2.expand(a.shape[0], *x2.shape)), a).transpose(0, 1).reshape(x2.shape[0], -1)
        y = torch.addmm(lin.base(x2), h, b)
        return y.view(*x.shape[:-1], y.shape[-1])


def apply(model: nn.Module, method) -> None:
    # Linears with several adapted blocks, grouped by kind across layers
    kinds: Dict[tuple, List[AdaptedLinear]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear) and len(mod.deltas) > 1:
            kinds.setdefault((name.rsplit(".", 1)[-1], tuple(sorted(mod.slices.items())),
                              tuple(mod.base.weight.shape)), []).append(mod)
    if kinds:
        units = list(kinds.values())
        pack = pack_parameters(model, [[lin.deltas[k] for lin in unit
                                        for k in sorted(lin.deltas, key=lambda k: lin.slices[k][0])]
                                       for unit in units], name="lora_pack")
        attach_batched(model, "lora_batched", LoRABatched(pack, units, method.dropout))
