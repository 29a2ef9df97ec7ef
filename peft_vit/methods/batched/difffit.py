"""DiffFit (methods/difffit.py) in training: every block's γ in one flat tensor
(``difffit_pack.gamma``), split once per forward into the views each scale reads; under bf16
autocast cast once per step, not once per scale (issue 22)."""
from __future__ import annotations

import torch.nn as nn

from ..difffit import ChannelScale
from ..wrappers import InsertedAfter
from . import pack_modules


def apply(model: nn.Module, method) -> None:
    scales = [m.inserted for m in model.modules() if isinstance(m, InsertedAfter) and isinstance(m.inserted, ChannelScale)]
    pack_modules(model, scales, "difffit")
