"""KAdaptation (methods/kadaptation.py) for every adapted Linear of one kind, all layers at once."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kadaptation import KAdaptationDelta
from ..wrappers import AdaptedLinear
from . import BatchedDeltas, attach_batched, block_onehot


class KAdaptationBatched(BatchedDeltas):
    """The factors of every adapted Linear of one kind (same blocks, e.g. q and v of every
    ``attn.qkv``) for all layers at once: the per-layer u, v (and biases) are stacked once per
    forward, each shared rule set meets them in one einsum. A Linear's update is then
    ``x Wᵀ + b + bias + dropout(x Q) P``: ``Q`` (in, G·n·r) holds its blocks' input factors side
    by side (one input-side matmul; dropout on ``x Q`` is element-wise, so it drops each block's
    terms independently, as before), ``P`` (G·n·r, NB·out) is block-diagonal with ``scale``
    folded in, zero for unadapted blocks: the update is written over the whole output at once."""

    def __init__(self, units: List[List[AdaptedLinear]]):
        super().__init__([lin for unit in units for lin in unit])
        self.__dict__["units"] = units  # plain references: the Linears are in the model already
        for u, unit in enumerate(units):
            onehot, _ = block_onehot(unit[0])
            self.register_buffer(f"onehot_{u}", onehot, persistent=False)
        self.where = [(u, i) for u, unit in enumerate(units) for i in range(len(unit))]

    def compute(self):
        out = []
        for u, unit in enumerate(self.units):
            lin0 = unit[0]
            keys = sorted(lin0.deltas, key=lambda k: lin0.slices[k][0])
            onehot = getattr(self, f"onehot_{u}")
            G, NB = onehot.shape
            ps, qs, biases = [], [], []
            for k in keys:
                d0 = lin0.deltas[k]
                us = torch.stack([lin.deltas[k].u for lin in unit])  # (L, n, out/a, r)
                vs = torch.stack([lin.deltas[k].v for lin in unit])
                ps.append(_kron_layers(d0.rules.a, us) * d0.scale)   # (L, out, n·r·r')
                qs.append(_kron_layers(d0.rules.b, vs))              # (L, in, n·r·r')
                if d0.bias_module is not None:
                    biases.append((g := keys.index(k), torch.stack([lin.deltas[k].bias_module.bias for lin in unit])))
            L, size, R = ps[0].shape
            q = torch.cat(qs, -1) if G > 1 else qs[0]                      # (L, in, G·R)
            p = torch.stack(ps, 1).transpose(-1, -2) if G > 1 else ps[0].transpose(-1, -2).unsqueeze(1)
            p = (p.unsqueeze(3) * onehot[:, None, :, None]).reshape(L, G * R, NB * size)
            bias = None
            if biases:  # each block's bias on its own rows (a shared bias is on both)
                stacked = torch.stack([b for _, b in biases], 1)               # (L, Gb, out)
                rows = onehot[[g for g, _ in biases]]                           # (Gb, NB)
                bias = torch.einsum("lgo,gb->lbo", stacked, rows).reshape(L, NB * size)
            q, p, bias = self.cast(q, p, bias)
            out.extend(zip(q.unbind(0), p.unbind(0), bias.unbind(0) if bias is not None else [None] * L))
        return out

    def forward_linear(self, lin, index, x):
        q, p, bias = self._cache[index]
        u, _ = self.where[index]
        if x.dtype != q.dtype:
            q, p = q.to(x.dtype), p.to(x.dtype)
        first = next(iter(lin.deltas.values()))
        dropout = first.dropout
        x2 = x.reshape(-1, x.shape[-1])
        b = lin.base.bias
        if bias is not None:
            b = bias if b is None else b + bias
        if first.dropout_mode == "matrix" and dropout.training and isinstance(dropout, nn.Dropout):
            # element-wise dropout on ΔWᵀ = Q P (in, NB·out; zero for unadapted blocks), one mask
            y = F.linear(x2, lin.base.weight + dropout(q @ p).t(), b)
        else:
            y = torch.addmm(F.linear(x2, lin.base.weight, b), dropout(x2 @ q), p)
        return y.view(*x.shape[:-1], y.shape[-1])


def _kron_layers(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """:func:`kron_columns` for L layers at once: (n,p,s) × (L,n,q,t) -> (L, p·q, n·s·t)."""
    n, p, s = left.shape
    L, _, q, t = right.shape
    return torch.einsum("nps,lnqt->lpqnst", left, right).reshape(L, p * q, n * s * t)


def apply(model: nn.Module, method) -> None:
    kinds: Dict[tuple, List[AdaptedLinear]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear) and all(isinstance(d, KAdaptationDelta) for d in mod.deltas.values()):
            key = (name.rsplit(".", 1)[-1], tuple(sorted(mod.slices.items())), tuple(mod.base.weight.shape),
                   tuple(id(d.rules) for _, d in sorted(mod.deltas.items())))
            kinds.setdefault(key, []).append(mod)
    attach_batched(model, "kadaptation_batched", KAdaptationBatched(list(kinds.values())))
