"""FacT-TK (methods/fact_tk.py): per forward, all cores in one matmul and the Q, R of every adapted
Linear of one kind (e.g. every ``attn.qkv``) for all layers at once."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..fact_tk import FacTDelta
from ..wrappers import AdaptedLinear
from . import BatchedDeltas, attach_batched, linear_units, low_rank_output


class FacTBatched(BatchedDeltas):
    """Per forward, all cores in one matmul and the Q, R of every adapted Linear of one kind."""

    def __init__(self, factors, units: List[List[AdaptedLinear]]):
        super().__init__([lin for unit in units for lin in unit])
        self.__dict__["factors"] = factors  # a plain reference: the model owns it (model.fact_tk)
        self.__dict__["units"] = units  # plain references: the Linears are in the model already
        for u, unit in enumerate(units):
            cols = [torch.arange(d.first, d.first + d.p_in * d.p_out) for d in (lin.deltas["all"] for lin in unit)]
            self.register_buffer(f"cols_{u}", torch.stack(cols), persistent=False)

    def compute(self):
        t = self.factors.cores()
        out = []
        for u, unit in enumerate(self.units):
            d0 = unit[0].deltas["all"]
            q = d0.q_from(d0.kmat(t[getattr(self, f"cols_{u}")]))  # (L, in, p_out·r)
            # R is the same for the L Linears; one view each, so that backward gathers their
            # gradients in one op instead of L - 1 accumulations
            q, r = self.cast(q, d0.r_mat())
            r = r.expand(q.shape[0], -1, -1).unbind(0)
            out.extend((qi, ri, d0.dropout) for qi, ri in zip(q.unbind(0), r))
        return out

    def forward_linear(self, lin, index, x):
        q, r, dropout = self._cache[index]
        return low_rank_output(lin, x, q, r, inner_dropout=dropout)


def apply(model: nn.Module, method) -> None:
    # one unit per kind of Linear (e.g. every attn.qkv); the core layout must match within a unit
    units = linear_units(model, FacTDelta, key=lambda lin: lin.deltas["all"].interleave)
    attach_batched(model, "fact_tk_batched", FacTBatched(model.fact_tk, units))
