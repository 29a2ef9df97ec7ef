"""SSF (methods/ssf.py) in training: every affine's γ and β in one flat tensor (``ssf_pack.ssf``),
split once per forward into the views each affine reads (:meth:`ParamPack.read`): the optimiser
steps one tensor instead of two per site."""
from __future__ import annotations

import torch.nn as nn

from . import pack_modules


def apply(model: nn.Module, method) -> None:
    pack_modules(model, method.affines, "ssf", label="ssf")  # in the order the method inserted them
