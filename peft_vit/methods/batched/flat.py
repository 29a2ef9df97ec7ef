"""A method of small modules that each run on their own (RepAdapter's adapters, Convpass's
bypasses): every parameter of every module it added in one flat tensor per kind
(``<method>_pack.<method>`` for the 1-d ones, ``<method>_pack.<method>_matrix`` for the rest),
split once per forward into the views each module reads (:meth:`ParamPack.read`). The optimiser
steps two tensors instead of a few per module; the modules' math is untouched. Under autocast the
pack is cast once per step (:func:`~peft_vit.methods.batched.pack_modules`)."""
from __future__ import annotations

import torch.nn as nn

from ..wrappers import PeftModule
from . import pack_modules


def apply(model: nn.Module, method) -> None:
    added = {id(m) for top in model.modules() if isinstance(top, PeftModule) for m in top.modules()}
    # one unit per module that holds parameters itself (e.g. a bypass's down, conv and up), in model order
    owners = [m for m in model.modules() if id(m) in added and any(True for _ in m.parameters(recurse=False))]
    if owners:
        pack_modules(model, owners, method.name, label=method.name)
