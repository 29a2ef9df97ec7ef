"""AdaptFormer (Chen, Ge, Tong, Wang, Song, Wang and Luo, NeurIPS 2022; official code
ShoufaChen/AdaptFormer): a bottleneck branch parallel to each block's MLP ("AdaptMLP").

The branch reads the block's stream before LN2 and its output joins the MLP's::

    x = x + DropPath(MLP(LN2(x))) + s · (W_up · Dropout(ReLU(W_down x + b_d)) + b_u)

with s = 0.1 fixed, W_down kaiming-uniform (a=√5), W_up and both biases zero, so the model starts
as the backbone. The branch is the project's one :class:`~peft_vit.methods.adapter.Adapter`
module (``residual=False``), placed with ``insert_parallel``. Where the paper is silent, the
official code decides (models/custom_modules.py, models/adapter.py, main_image.py): dropout 0.1
on the bottleneck, no LayerNorm inside the branch, the branch not under drop-path (nor, on
DINOv2, under the MLP's layer scale), biases on both projections.

Bottleneck: 64, the paper's image setting (main_image.py's default):
12 · (768·64 + 64 + 64·768 + 768) = 1,189,632 parameters on ViT-B/16. Tables that reprint
AdaptFormer on VTAB-1k at "0.16M" ran it with bottleneck 8 (156,768, the count of NOAH's
adapter): ``bottleneck=8`` reproduces that setting.

Options: ``init: xavier`` or ``noah`` start from another init (see adapter.py); ``blocks`` names
other transformer blocks. Swin works as well: each block's width is read from its ``norm2``.
A ReLU sits between the projections: not mergeable (merge raises ``NotMergeableError``).
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .adapter import Adapter
from .base import Method, block_names, insert_parallel, register_method


@register_method("adaptformer")
class AdaptFormer(Method):
    mergeable = False

    def __init__(self, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1, init: str = "lora",
                 blocks: Optional[str] = None):
        if init not in ("lora", "xavier", "noah"):
            raise ValueError(f"adaptformer init={init!r}; choose lora (AdaptFormer's), xavier or noah")
        self.bottleneck, self.scale, self.dropout = int(bottleneck), float(scale), float(dropout)
        self.init, self.blocks = init, blocks

    def inject(self, model: nn.Module) -> None:
        for b in block_names(model, self.blocks):
            dim = model.get_submodule(f"{b}.norm2").normalized_shape[-1]
            branch = Adapter(dim, self.bottleneck, "relu", self.dropout, self.scale, self.init, residual=False)
            # added at the MLP branch's output (after its drop-path), fed by the input of LN2
            insert_parallel(model, f"{b}.drop_path2", branch, input_of=f"{b}.norm2")
