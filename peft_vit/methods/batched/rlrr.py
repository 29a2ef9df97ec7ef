"""RLRR (methods/rlrr.py) in training: each block's RLRR and SSF parameters in one flat tensor per
decay group (``blocks.i.rlrr_pack.<contents>_decay`` and ``_nodecay``; one tensor with
``decay_groups: timm``), split once per forward; a Linear whose blocks are all adapted (q, k, v
of the fused qkv, or the whole matrix) builds ``W' = W ⊙ (1 + s_out s_inᵀ)`` of all its blocks
in one broadcast op."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...backbone import block_names
from ..rlrr import RLRRDelta, _official_decays
from ..ssf import SSF
from ..wrappers import AdaptedLinear, InsertedAfter
from . import BatchedDeltas, attach_batched, pack_parameters


class RLRRBatched(BatchedDeltas):
    """W' of every fused adapted Linear from the views of its block's pack. Under autocast each
    pack is cast once per step to the compute dtype (``cast_packs``; SSF's affines read the same
    views) and ``W ⊙ (1 + s_out s_inᵀ)`` is formed from the held bf16 W in bf16: a scaling, not
    an orthogonal product, whose fp32 form autocast would round to bf16 for the matmul anyway."""

    cast_packs = True

    def __init__(self, packs, members):
        # members[i]: (pack index, unit index, AdaptedLinear)
        super().__init__([m for _, _, m in members], packs=packs)
        self.members = [(p, u) for p, u, _ in members]
        self.shapes = [_fused_shape(m) for _, _, m in members]

    def compute(self):
        views = [pack.unpack() for pack in self.packs]
        out = []
        for (p, u), (g, o, i) in zip(self.members, self.shapes):
            v = views[p]
            out.append((v[(u, "s_out")].view(g, o, 1), v[(u, "s_in")].view(g, 1, i), v[(u, "f")]))
        return out

    def forward_linear(self, lin, index, x):
        s_out, s_in, f = self._cache[index]
        w = lin.base.weight
        w3 = w.view(s_out.shape[0], s_out.shape[1], w.shape[1])
        w = torch.addcmul(w3, w3, s_out * s_in).view_as(w)  # W ⊙ (1 + s_out s_inᵀ), all blocks at once
        b = f if lin.base.bias is None else lin.base.bias + f
        return F.linear(x, w, b)


def _fused_shape(lin: AdaptedLinear):
    """(blocks, rows per block, in) when every block of ``lin`` is adapted, in row order."""
    rows = sorted(lin.slices.values())
    size = rows[0][1] - rows[0][0]
    if rows != [(i * size, (i + 1) * size) for i in range(lin.out_features // size)]:
        return None
    return len(rows), size, lin.in_features


def apply(model: nn.Module, method) -> None:
    """One flat parameter per block (the per-block counts stay where they were)."""
    packs, members, affines = [], [], 0
    for b in block_names(model, method.blocks):
        block = model.get_submodule(b)
        units, owners, label = [], [], []
        for name, mod in block.named_modules():
            if isinstance(mod, AdaptedLinear) and all(isinstance(d, RLRRDelta) for d in mod.deltas.values()):
                keys = sorted(mod.deltas, key=lambda k: mod.slices[k][0])
                units.append([mod.deltas[k] for k in keys])
                owners.append(mod if _fused_shape(mod) is not None else None)
                label.append("".join(keys) if keys != ["all"] else name.rsplit(".", 1)[-1])
            elif isinstance(mod, InsertedAfter) and isinstance(mod.inserted, SSF):
                units.append([mod.inserted])
                owners.append(None)  # reads its γ, β from the pack's split (ParamPack.read)
                affines += 1
                label.append(f"ssf_{name}")
        if not units:
            continue
        # one tensor named after its contents, e.g. qkv_proj_fc1_fc2_ssf_norm1_ssf_norm2
        group = (lambda m, n: "decay" if _official_decays(m, n) else "nodecay") if method.decay_groups == "official" else None
        packs.append(pack_parameters(block, units, name="rlrr_pack", label="_".join(label), group=group))
        members += [(len(packs) - 1, u, m) for u, m in enumerate(owners) if m is not None]
    if members or affines:
        attach_batched(model, "rlrr_batched", RLRRBatched(packs, members))
