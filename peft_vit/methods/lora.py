"""LoRA as run for the VTAB tables (NOAH's code, ZhangYuanhan-AI/NOAH).

``W' = W + scale · B A`` in parallel with the frozen Linear, ``scale = alpha / rank``, dropout on
the LoRA input only. Initialisation (``init``):

* ``paper`` (default): A (rank × in) kaiming-uniform(a=√5), B (out × rank) zeros, so the model
  starts as the backbone (LoRA's paper; NOAH's LoRA module as written);
* ``noah``: as NOAH's code actually runs. Its model calls ``init_weights`` after building the
  blocks, which re-initialises every Linear, A and B included, to trunc-normal(std 0.02): B ≠ 0,
  so the model is *not* the backbone at start. The ``vtab_noah`` preset uses it.

Defaults: the fused ``qkv`` as ONE matrix (A 8×768, B 2304×8), rank 8, alpha 8 (scale 1, NOAH
applies no α/r scaling), dropout 0.1: 294,912 parameters on ViT-B/16. ``targets=[q, v]`` adapts
the q and v blocks of the fused projection separately (same count at rank 8).

Numerically identical to ``huggingface/peft``'s LoRA with the same A and B (tested).

With several blocks of one fused projection (``targets=[q, v]``) the A and B of all layers live
in one :class:`ParamPack` and each projection runs its blocks together: one input-side matmul
with the blocks' A side by side, one block-diagonal output matmul (zero for unadapted blocks).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from .base import (AdaptedLinear, BatchedDeltas, Delta, Method, adapt_linears, attach_batched, block_onehot,
                   pack_parameters, register_method)


class LoRADelta(Delta):
    def __init__(self, out_features: int, in_features: int, rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, init: str = "paper"):
        super().__init__()
        if rank <= 0:
            raise ValueError("LoRA rank must be positive")
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        if init == "noah":  # NOAH's init_weights: every Linear trunc-normal(0.02)
            nn.init.trunc_normal_(self.lora_A, std=0.02)
            nn.init.trunc_normal_(self.lora_B, std=0.02)
        elif init == "paper":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            raise ValueError(f"method.init={init!r}; choose paper or noah")
        self.scale = float(alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, weight, bias):
        h = self.dropout(x) @ self.lora_A.t().to(x.dtype)
        return (h @ self.lora_B.t().to(x.dtype)) * self.scale

    def delta_weight(self, weight):
        return (self.lora_B @ self.lora_A) * self.scale


class LoRABatched(BatchedDeltas):
    """The LoRA blocks of fused projections (q and v of every ``attn.qkv``), all layers at once."""

    def __init__(self, pack, units: List[List[AdaptedLinear]], dropout: float):
        super().__init__([lin for unit in units for lin in unit])
        self.__dict__["pack"] = pack  # a plain reference: the pack is registered on the model
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
        views = self.pack.unpack()
        out = []
        for u, (L, G, r, n_in, size, scale) in enumerate(self.shapes):
            a = views[(u, "lora_A")].view(L, G, r, n_in)
            b = views[(u, "lora_B")].view(L, G, size, r).transpose(-1, -2)           # (L, G, r, out)
            a = a.permute(0, 3, 1, 2).reshape(L, n_in, G * r) if self.dropout is None else a.transpose(-1, -2)
            onehot = getattr(self, f"onehot_{u}")
            b = (b.unsqueeze(3) * (onehot * scale if scale != 1.0 else onehot)).reshape(L, G * r, -1)
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


@register_method("lora")
class LoRA(Method):
    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.1,
                 targets: Sequence[str] = ("qkv",), init: str = "paper"):
        if init not in ("paper", "noah"):
            raise ValueError(f"method.init={init!r}; choose paper or noah")
        self.init = init
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.targets = [targets] if isinstance(targets, str) else list(targets)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, lambda site: LoRADelta(
            site.out_features, site.in_features, self.rank, self.alpha, self.dropout, self.init))
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
            attach_batched(model, "lora_batched", LoRABatched(pack, units, self.dropout))
