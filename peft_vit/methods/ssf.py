"""SSF: scaling and shifting features (Lian, Zhou, Feng and Wang, NeurIPS 2022; official code
dongzelian/SSF, ``models/vision_transformer.py`` and ``models/swin_transformer.py``).

Every operation of the frozen backbone is followed by a learned per-channel affine::

    y = x · γ + β,   γ, β ∈ R^C  (C: the operation's output channels)

Placement (the official ViT and Swin files): in every transformer block after ``norm1``,
``attn.qkv`` (γ, β ∈ R^{3D}), ``attn.proj``, ``norm2``, ``mlp.fc1`` (R^{4D}) and ``mlp.fc2``;
after the patch-embedding convolution (before its norm, when it has one) and after every other
LayerNorm outside the blocks: the patch-embedding norm (Swin), the patch-merging norm (Swin,
R^{4D}), CLIP's ``norm_pre`` and the final norm (``norm``, or ``fc_norm`` for timm models that
pool with it). The official code has no ``norm_pre`` (its ViT has none): SSF after it follows
the paper's rule, one affine after every operation. Swin's widths differ by stage; each affine
takes the width of the module it follows.

Init (official ``init_ssf_scale_shift``): γ ~ N(1, 0.02), β ~ N(0, 0.02) (``std``), so the model
is not exactly the backbone at start. Only γ, β and the head train (the official
``optim_factory.py`` freezes every parameter but the head's and the ``ssf_scale``/``ssf_shift``
ones); they are 1-d, so timm's rule exempts them from weight decay, as the same file does.

ViT-B/16 (D = 768, 12 blocks): per block 2 · (768 + 2,304 + 768 + 768 + 3,072 + 768) = 16,896;
12 · 16,896 + 2 · 768 (patch embedding) + 2 · 768 (final norm) = 205,824 without the head.

Merging: each affine folds exactly into the module it follows: a Linear's or convolution's rows
(``W ← diag(γ) W``, ``b ← γ b + β``), a LayerNorm's affine (``w ← γ w``, ``b ← γ b + β``). A
bias-free patch convolution (CLIP) takes γ in its weight and β in the patch positions of the
position embedding, which every patch token adds right after it (so the merged model keeps the
backbone's parameter names); any other bias-free module gets the shift as a new bias. During training an affine after a LayerNorm runs as one LayerNorm
with the folded affine (no second activation stored). In training all γ and β live in one flat
tensor, so the optimiser steps one tensor, not two per site (methods/batched/ssf.py).

:class:`SSF` is also RLRR's affine (rlrr.py): one implementation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..precision import like
from .base import Method, NotMergeableError, PeftModule, block_names, insert_after, register_method

SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


class SSF(PeftModule):
    """``x·γ + β`` over the channel dimension (the last one, or dim 1 of a convolution's NCHW
    output); folds into the Linear, convolution, LayerNorm or timm PatchEmbed it follows.
    ``decays``: whether RLRR's official decay groups decay it (rlrr.py)."""

    def __init__(self, dim: int, std: float = 0.02, decays: bool = False):
        super().__init__()
        self.decays = decays
        self.gamma = nn.Parameter(torch.empty(dim).normal_(1.0, std))
        self.beta = nn.Parameter(torch.empty(dim).normal_(0.0, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # γ, β in the activation's dtype (under autocast: not promoting it to fp32; precision.py)
        return x * like(self.gamma, x.dtype) + like(self.beta, x.dtype)

    def forward_after(self, original: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``SSF(original(x))``; after an affine LayerNorm, one LayerNorm with the folded affine
        (γ·w, γ·b + β, in the LayerNorm's fp32): the same values without storing the LayerNorm's
        output for backward."""
        gamma, beta = self.gamma, self.beta
        if isinstance(original, nn.LayerNorm) and original.weight is not None and original.bias is not None:
            return F.layer_norm(x, original.normalized_shape, original.weight * gamma,
                                torch.addcmul(beta, original.bias, gamma), original.eps)
        y = original(x)
        gamma, beta = like(gamma, y.dtype), like(beta, y.dtype)
        if isinstance(original, nn.Conv2d):  # NCHW: channels on dim 1
            return y * gamma.view(-1, 1, 1) + beta.view(-1, 1, 1)
        return y * gamma + beta

    @torch.no_grad()
    def fold_into(self, original: nn.Module) -> nn.Module:
        """Fold into ``original`` (in place) so that ``original'(x) = SSF(original(x))``."""
        g, b = self.gamma, self.beta
        if isinstance(original, nn.LayerNorm) and original.weight is not None and original.bias is not None:
            target = original
        elif isinstance(original, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            target = original
        elif hasattr(original, "proj") and hasattr(original, "norm"):  # timm PatchEmbed, channel-last out
            fmt = getattr(getattr(original, "output_fmt", None), "value", None)
            if not (getattr(original, "flatten", False) or fmt == "NHWC"):
                raise NotMergeableError("SSF after a channel-first patch embedding cannot be folded")
            inner = original.norm if not isinstance(original.norm, nn.Identity) else original.proj
            self.fold_into(inner)
            return original
        else:
            raise NotMergeableError(f"SSF cannot be folded into a {type(original).__name__}")
        w = target.weight
        shape = (-1,) + (1,) * (w.dim() - 1)
        w.mul_(g.to(w.dtype).view(shape))
        if target.bias is not None:
            target.bias.mul_(g.to(w.dtype)).add_(b.to(w.dtype))
            return original
        shift_into = self.__dict__.get("shift_into")  # (position embedding, first patch position)
        if shift_into is not None:
            pos, start = shift_into
            pos[:, start:].add_(b.to(pos.dtype))
        else:  # a bias-free Linear: the shift becomes its bias
            target.bias = nn.Parameter(b.detach().to(w.dtype).clone(), requires_grad=False)
        return original


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    raise TypeError(f"ssf: no channel width for a {type(module).__name__}")


@register_method("ssf")
class SSFMethod(Method):
    batched = "ssf"  # every γ and β in one trainable tensor: methods/batched/ssf.py

    def __init__(self, sites: Sequence[str] = SITES, std: float = 0.02, blocks: Optional[str] = None):
        self.sites = list(sites)
        self.std = float(std)
        self.blocks = blocks

    def inject(self, model: nn.Module) -> None:
        blocks = block_names(model, self.blocks)
        names = dict(model.named_modules())
        affines = []
        for b in blocks:
            for s in self.sites:
                if f"{b}.{s}" not in names:
                    raise ValueError(f"method ssf: {type(model).__name__} block {b} has no module {s!r}; "
                                     f"set method.sites to the block's module names")
                affines.append(insert_after(model, f"{b}.{s}", SSF(_width(names[f"{b}.{s}"]), self.std)).inserted)
        proj = names.get("patch_embed.proj")
        if isinstance(proj, nn.Conv2d):
            ssf = SSF(proj.out_channels, self.std)
            pos = getattr(model, "pos_embed", None)
            if proj.bias is None and isinstance(pos, nn.Parameter):
                prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
                ssf.__dict__["shift_into"] = (pos, prefix)  # a plain reference: merge folds β there
            affines.append(insert_after(model, "patch_embed.proj", ssf).inserted)
        # every other LayerNorm outside the blocks: patch-embedding and patch-merging norms, norm_pre, final norm
        inside = tuple(f"{b}." for b in blocks)
        for n, m in names.items():
            if isinstance(m, nn.LayerNorm) and not n.startswith(inside) and n != "head" and not n.startswith("head."):
                affines.append(insert_after(model, n, SSF(_width(m), self.std)).inserted)
        self.affines = affines  # in insertion order, for the batched plan
