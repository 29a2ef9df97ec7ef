"""RepAdapter (methods/repadapter.py) in training: the up-projections (W_B, b_B) of every adapter and
their down-projections (W_A, b_A) in one flat tensor per name (``repadapter_pack.up_weight``,
``.up_bias``, ``.weight``, ``.bias``), split once per forward into the views each adapter reads;
under bf16 autocast cast once per step, not once per adapter (issue 22)."""
from __future__ import annotations

import torch.nn as nn

from ..repadapter import RepAdapter
from ..wrappers import InsertedAfter
from . import pack_modules


def apply(model: nn.Module, method) -> None:
    adapters = [m.inserted for m in model.modules() if isinstance(m, InsertedAfter) and isinstance(m.inserted, RepAdapter)]
    pack_modules(model, adapters + [a.down for a in adapters], "repadapter")
