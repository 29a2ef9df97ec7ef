"""Convpass (Jie and Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters", 2022;
official code JieShibo/PETL-ViT, ``convpass/vtab/convpass.py``): a convolutional bypass parallel
to the attention and to the MLP of every block, reading the same LayerNorm output::

    x = x + DropPath(Attn(LN1(x))) + s · DropPath(C₁(LN1(x)))
    x = x + DropPath(MLP(LN2(x)))  + s · DropPath(C₂(LN2(x)))
    C(z) = W_up · Dropout(σ(Conv3×3(σ(W_down z + b_d)))) + b_up,    σ = QuickGELU

The patch tokens go through the 3×3 convolution (padding 1) on their 2-D grid; the class token
(and any other prefix token: registers) through the same convolution as a 1×1 image, i.e. its
centre tap and bias only (official: ``x_cls`` reshaped to 1×1). Init (official): W_down
xavier-uniform, W_up and all biases zero (so the model starts as the backbone); the convolution
the identity on its centre tap (``xavier_init: false``, the official class default) or
xavier-uniform (``true``). Bottleneck 8, dropout 0.1 (official ``set_Convpass(dim=8)``).

Choices where the paper is silent, from the official code:

* the branch has its own drop-path, at the block's rate (the official ``self.drop_path`` called a
  second time: an independent mask), and is outside the layer scale of DINOv2-style blocks (the
  official blocks have none).
* ``scale`` s: per task in the official configs (``convpass/vtab/configs/convpass/*.yaml``:
  0.01 … 100, with ``xavier_init`` per task too); the default 1 is ``set_Convpass``'s. The
  unified study (OSU-MLB/ViT_PEFT_Vision) searches s ∈ {0.01, 0.1, 1, 10, 100}.
* ``placement: attn`` is the official ``convpass_attn`` (the attention side only).
* Swin: the official code has a separate Swin variant (all tokens on one √N×√N grid); timm's
  current Swin blocks run on (B, H, W, C) maps, so it is not offered here and Swin raises
  :class:`~peft_vit.methods.base.UnsupportedBackboneError`.

In training every bypass's parameters sit in two flat tensors (methods/batched/flat.py), split
once per forward; the math is each bypass's own (outputs and gradients to the bit, tested). A
step costs 1.95× full fine-tuning's ops (2.12× without the plan): 24 bypasses run one after the
other, each with two QuickGELUs, the patch grid through the conv and the prefix through its centre
tap; any other arrangement of those (e.g. the conv on a channels-last view) sums differently.

ViT-B/16: per bypass W_down 768·8 + 8 + conv 8·8·9 + 8 + W_up 8·768 + 768 = 13,648; 24 bypasses →
327,552 without the head (the paper's 0.33M). QuickGELUs and a convolution between the
projections: not mergeable (merge raises ``NotMergeableError``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, get_act_layer

from .base import Method, PeftModule, UnsupportedBackboneError, backbone_family, block_names, insert_parallel, \
    register_method

PLACEMENTS = {"block": (("attn", "drop_path1"), ("mlp", "drop_path2")), "attn": (("attn", "drop_path1"),)}


class ConvBypass(PeftModule):
    """``s · DropPath(W_up Dropout(σ(Conv(σ(W_down z)))))`` on (B, prefix + H·W, D) tokens."""

    def __init__(self, dim: int, grid, prefix: int, bottleneck: int = 8, scale: float = 1.0, dropout: float = 0.1,
                 xavier_init: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.grid, self.prefix, self.scale = tuple(grid), int(prefix), float(scale)
        self.down = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv2d(bottleneck, bottleneck, 3, 1, 1)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            if xavier_init:
                nn.init.xavier_uniform_(self.conv.weight)
            else:
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(bottleneck)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.act = get_act_layer("quick_gelu")()
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, N, _ = z.shape
        (H, W), P = self.grid, self.prefix
        if N != P + H * W:
            raise ValueError(f"convpass: {N} tokens are not {P} prefix + {H}×{W} patches; the bypass was built "
                             "for the model's img_size (dynamic image sizes are not supported)")
        h = self.act(self.down(z))
        patches = self.conv(h[:, P:].transpose(1, 2).reshape(B, -1, H, W)).flatten(2).transpose(1, 2)
        prefix = F.linear(h[:, :P], self.conv.weight[:, :, 1, 1], self.conv.bias)  # each as a 1×1 image
        h = self.dropout(self.act(torch.cat([prefix, patches], dim=1)))
        out = self.up(h)
        return self.drop_path(out if self.scale == 1.0 else out * self.scale)


@register_method("convpass")
class Convpass(Method):
    batched = "flat"  # every parameter in two flat tensors, split once per forward: methods/batched/flat.py
    mergeable = False

    def __init__(self, bottleneck: int = 8, scale: float = 1.0, dropout: float = 0.1, xavier_init: bool = False,
                 placement: str = "block", blocks: Optional[str] = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"convpass placement={placement!r}; choose block (official convpass) or attn (convpass_attn)")
        self.bottleneck, self.scale, self.dropout = int(bottleneck), float(scale), float(dropout)
        self.xavier_init, self.placement, self.blocks = bool(xavier_init), placement, blocks

    def inject(self, model: nn.Module) -> None:
        family = backbone_family(model)
        if family != "vit":
            raise UnsupportedBackboneError(
                f"convpass runs its 3×3 convolution on a ViT's token sequence (prefix tokens + one patch grid); "
                f"{family} blocks are not supported (the official Swin variant is not offered here): use adaptformer "
                "or another per-token method there")
        grid, prefix = model.patch_embed.grid_size, getattr(model, "num_prefix_tokens", 1)
        for b in block_names(model, self.blocks):
            dim = model.get_submodule(f"{b}.norm1").normalized_shape[-1]
            for branch, drop in PLACEMENTS[self.placement]:
                rate = getattr(model.get_submodule(f"{b}.{drop}"), "drop_prob", 0.0)
                bypass = ConvBypass(dim, grid, prefix, self.bottleneck, self.scale, self.dropout, self.xavier_init, rate)
                # added at the branch's output (after its drop-path), fed by the branch's input: LN's output
                insert_parallel(model, f"{b}.{drop}", bypass, input_of=f"{b}.{branch}")
