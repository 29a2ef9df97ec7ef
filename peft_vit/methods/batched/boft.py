"""BOFT (methods/boft.py) for every adapted Linear of one shape at once, on OFT's plan
(methods/batched/oft.py, :class:`RotationBatched`): the m butterfly factors of every block of
every layer from one Cayley solve per forward; per Linear m blockwise products with the butterfly
permutations between them as m + 1 column gathers (P_iᵀ of factor i and P_{i+1} of the next
composed into one index, ``a[b]`` for ``index_select(a)`` then ``index_select(b)``), and the
output scale of all blocks as one row product."""
from __future__ import annotations

import torch.nn as nn

from ..boft import BOFTDelta
from . import attach_batched, linear_units, ordered_deltas, pack_parameters
from .oft import RotationBatched


def butterfly_gathers(delta: BOFTDelta):
    """Column gathers of BOFTDelta.rotated: before factor i (i ≥ 1) ``inverse_i`` after the
    previous factor's ``perm_{i−1}`` (P_1 = I: none), after the last ``perm_{m−1}``."""
    m = delta.factors
    out = [None] * (m + 1)
    for i in range(1, m):
        inverse = getattr(delta, f"inverse_{i}")
        out[i] = inverse if i == 1 else getattr(delta, f"perm_{i - 1}")[inverse]
    if m > 1:
        out[m] = getattr(delta, f"perm_{m - 1}")
    return out


def apply(model: nn.Module, method) -> None:
    units = linear_units(model, BOFTDelta)
    if units:
        pack = pack_parameters(model, [[d for lin in unit for d in ordered_deltas(lin)] for unit in units],
                               name="boft_pack")
        attach_batched(model, "boft_batched", RotationBatched(pack, units, "boft_r", method.factors, 0, method.dropout,
                                                              butterfly_gathers, scale="boft_s"))
