"""RLRR: residual low-rank rescaling (Dong et al., CVPR 2024; code zstarN70/RLRR).

Every Linear of every block (q, k, v block-wise, o, fc1, fc2) is rescaled element-wise::

    W' = W ⊙ (1 + s_out s_inᵀ),   b' = b + f

and an SSF affine ``x·γ + β`` follows LN1 and LN2 of every block, the final norm and the
patch embedding. ViT-B/16: 12 · 23,808 + 2 · 1,536 = 288,768 parameters.

Official initialisation (so ΔW ≠ 0 at start): s_in ~ U(±√(6/in)), s_out ~ U(±√6) (kaiming-uniform
of shapes (1, in) and (out, 1)), f = 0, γ ~ N(1, 0.02), β ~ N(0, 0.02).

The official "drop path" is element-wise dropout on each residual branch, rising linearly
0 → ``drop`` over the blocks; it replaces the backbone's drop-path modules (``drop: null`` keeps
the backbone's own stochastic depth instead).

Weight decay (``decay_groups``): ``official`` (default) follows the official
``get_parameters``, which exempts only names containing "bias" or "norm": s_in, s_out, the
patch-embedding SSF γ/β and the head's weight decay; f (``shift_bias`` there), the SSF γ/β after
LN1, LN2 and the final norm and the head's bias do not. ``timm`` is timm's rule (no 1-d tensor
decays, i.e. none of RLRR's parameters). The official script also zero-initialises the head:
``model.zero_head`` (set by the ``vtab_rlrr`` and ``fgvc_rlrr`` presets).

The forward builds W' and runs one matmul (``AdaptedLinear(weight_space=True)``); merging builds
the same W' block by block. In training each block's RLRR and SSF parameters live in one flat
tensor per decay group, and W' of all blocks of a fused Linear is one broadcast op
(methods/batched/rlrr.py). SSF after a LayerNorm folds into the LayerNorm's affine (in training too: the forward
runs one LayerNorm with the folded affine, so the LayerNorm's output is not stored twice); after the
patch embedding it folds into the patch-projection conv (or the embedding's norm, when it has one).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .base import Delta, Method, adapt_linears, block_names, insert_after, register_method, replace_module
from .ssf import SSF  # the SSF affine, shared with the ssf method

TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


class RLRRDelta(Delta):
    """ΔW = W ⊙ (s_out s_inᵀ), Δb = f."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        # official init: kaiming_uniform_ on (1, in) and (out, 1) -> U(±√(6/in)), U(±√6)
        self.s_in = nn.Parameter(torch.empty(in_features).uniform_(-1, 1) * math.sqrt(6 / in_features))
        self.s_out = nn.Parameter(torch.empty(out_features).uniform_(-1, 1) * math.sqrt(6))
        self.f = nn.Parameter(torch.zeros(out_features))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * torch.outer(self.s_out, self.s_in).to(weight.dtype)

    def delta_bias(self, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.f


def _official_decays(module: nn.Module, name: str) -> bool:
    """Does the official code decay this parameter? s_in, s_out and the patch-embedding SSF."""
    return name in ("s_in", "s_out") if isinstance(module, RLRRDelta) else bool(getattr(module, "decays", False))


class ResidualDropout(nn.Dropout):
    """RLRR's "drop path": element-wise dropout on a residual branch; nothing at inference."""

    def merged_replacement(self) -> nn.Module:
        return nn.Identity()


@register_method("rlrr")
class RLRR(Method):
    batched = "rlrr"  # one flat tensor per block, W' of a fused Linear in one op: methods/batched/rlrr.py

    def __init__(self, targets=TARGETS, ssf: bool = True, drop: Optional[float] = 0.1,
                 blocks: Optional[str] = None, decay_groups: str = "official"):
        if decay_groups not in ("official", "timm"):
            raise ValueError(f"method.decay_groups={decay_groups!r}; choose official or timm")
        self.decay_groups = decay_groups
        self.targets = list(targets)
        self.ssf = bool(ssf)
        self.drop = None if drop is None else float(drop)
        self.blocks = blocks

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, lambda site: RLRRDelta(site.out_features, site.in_features),
                      blocks=self.blocks, weight_space=True)
        blocks = block_names(model, self.blocks)
        if self.ssf:
            for b in blocks:
                for ln in ("norm1", "norm2"):
                    insert_after(model, f"{b}.{ln}", SSF(model.get_submodule(f"{b}.{ln}").normalized_shape[-1]))
            final = next((n for n in ("norm", "fc_norm") if isinstance(getattr(model, n, None), nn.LayerNorm)), None)
            if final is not None:
                insert_after(model, final, SSF(getattr(model, final).normalized_shape[-1]))
            if hasattr(model, "patch_embed"):
                pe, pos = model.patch_embed, getattr(model, "pos_embed", None)
                ssf = SSF(pe.proj.out_channels, decays=True)
                if pe.proj.bias is None and isinstance(pe.norm, nn.Identity) and isinstance(pos, nn.Parameter):
                    # CLIP's bias-free patch projection: merging folds β into the patch positions' embedding
                    start = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
                    ssf.__dict__["shift_into"] = (pos, start)
                insert_after(model, "patch_embed", ssf)
        if self.drop is not None:
            rates = torch.linspace(0, self.drop, len(blocks)).tolist() if blocks else []
            for b, p in zip(blocks, rates):
                for dp in ("drop_path1", "drop_path2"):
                    replace_module(model, f"{b}.{dp}", ResidualDropout(p))

    def no_weight_decay(self, model: nn.Module):
        """The official code's groups (module docstring), or timm's rule with ``decay_groups=timm``."""
        if self.decay_groups == "timm":
            return super().no_weight_decay(model)
        skip = set()
        for name, p in model.named_parameters():
            owner_name, _, pname = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if hasattr(owner, "members_of"):  # a packed tensor (methods/batched): one decay group each
                decays = all(_official_decays(m, n) for m, n in owner.members_of(pname))
            elif isinstance(owner, (RLRRDelta, SSF)):
                decays = _official_decays(owner, pname)
            else:  # the head, or what else trains: the official rule on the name
                decays = "bias" not in name and "norm" not in name
            if p.requires_grad and not decays:
                skip.add(name)
        return skip
