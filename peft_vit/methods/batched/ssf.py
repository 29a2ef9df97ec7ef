"""SSF (methods/ssf.py) in training: every affine's γ and β in one flat tensor (``ssf_pack.ssf``),
split once per forward into the views each affine reads (:meth:`ParamPack.read`): the optimiser
steps one tensor instead of two per site."""
from __future__ import annotations

import torch.nn as nn

from . import BatchedDeltas, attach_batched, pack_parameters


def apply(model: nn.Module, method) -> None:
    # in the order the method inserted them (method.affines)
    pack = pack_parameters(model, [[a] for a in method.affines], name="ssf_pack", label="ssf")
    batched = BatchedDeltas(packs=[pack])
    batched.cast_packs = True  # the affines read the split itself: under autocast, of the pack cast once
    attach_batched(model, "ssf_batched", batched)
