"""RepAdapter (Luo, Huang, Zhou, Sun, Chen, Sun and Ji, "Towards Efficient Visual Adaption via
Structural Re-parameterization", 2023; official code luogen1996/RepAdapter, ``repadapter.py``):
a linear adapter before the attention and before the MLP of every block, re-parameterised into
the following Linear after training::

    A(z) = z + s · (W_B · Dropout(W_A z + b_A) + b_B),     W_A: h×D,  W_B: D×h in G groups

placed between LN1 and the attention (so it feeds ``attn.qkv``) and between LN2 and the MLP
(feeding ``mlp.fc1``): the official ``forward_vit_block_adapter``, method ``repblock``
(``placement: block``; ``attn`` is its ``repattn``, the attention side only). W_B is the official
grouped 1×1 convolution (``groups=2``): output channels ``[g·D/G, (g+1)·D/G)`` read bottleneck
channels ``[g·h/G, (g+1)·h/G)``. Init (official): W_A xavier-uniform, b_A, W_B, b_B zeros, so the
model starts as the backbone; dropout 0.1 on the bottleneck.

Merging (the official ``set_RepWeight``): at inference A is the affine map
``z ↦ (I + s·W_B W_A) z + s·(W_B b_A + b_B)`` (W_B as its dense block-diagonal matrix), folded
into the Linear it feeds: ``W ← W (I + s W_B W_A)``, ``b ← b + s·W (W_B b_A + b_B)``. The merged
model is the plain backbone. On Swin the window partition and roll between LN1 and ``attn.qkv``
only permute tokens, so the same fold holds (the official code adapts Swin blocks too).

Defaults: bottleneck h = 8 (official ``--dim 8``), G = 2, s = 1 (the official class default; the
official VTAB configs ``configs/repblock/*.yaml`` set s per task, e.g. 5 for Caltech101; the
unified study OSU-MLB/ViT_PEFT_Vision searches s ∈ {0.1, 0.5, 1, 5, 10}). The official
``--sparse_lambda`` L2 penalty on W_B is off in its VTAB script (``scripts/train_repblock.sh``:
0) and is not implemented. Fused qkv: the adapter sits on the input of the whole ``attn.qkv``,
shared by q, k and v, as in the paper (no per-block choice).

In training every adapter's parameters sit in two flat tensors and, per forward of the model,
the dense W_B of every adapter is built at once (methods/batched/repadapter.py; each adapter
reads its weights through :meth:`RepAdapter.weights`): outputs and gradients to the bit as each
adapter's own path (tested), 0.93× full fine-tuning's ops per step (1.25× without the plan).

ViT-B/16: per adapter W_A 8·768 + b_A 8 + W_B 768·4 + b_B 768 = 9,992; 24 adapters → 239,808
without the head. The paper prints 0.22M: its count is the weights only (24 · 9,216 = 221,184).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..precision import compute_dtype, like
from .base import Method, NotMergeableError, PeftModule, block_names, insert_after, register_method

PLACEMENTS = {"block": (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")), "attn": (("norm1", "attn.qkv"),)}


class RepAdapter(PeftModule):
    """``z + s·(W_B Dropout(W_A z + b_A) + b_B)`` over the last dimension, W_B grouped; folds into
    the Linear it feeds (``feeds``, a plain reference set by the method)."""

    def __init__(self, dim: int, bottleneck: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.1):
        super().__init__()
        if bottleneck % groups or dim % groups:
            raise ValueError(f"repadapter: bottleneck {bottleneck} and width {dim} must divide into {groups} groups")
        self.groups, self.scale = int(groups), float(scale)
        self.down = nn.Linear(dim, bottleneck)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.up_weight = nn.Parameter(torch.zeros(dim, bottleneck // groups))  # the grouped conv's (D, h/G)
        self.up_bias = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # (layer, index) while a batched layer serves this adapter's weights (methods/batched/repadapter.py)
        self.served_by: Optional[tuple] = None

    def weights(self):
        """W_A, b_A, W_B (dense) and b_B: during the model's forward from the batched layer (every
        adapter's at once), else this module's own."""
        if self.served_by is not None and self.served_by[0].active:
            return self.served_by[0].weights(self.served_by[1])
        return self.down.weight, self.down.bias, self.dense_up(), self.up_bias

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        wa, ba, w, b = self.weights()
        dtype = compute_dtype(z)  # under autocast its matmul's dtype (z: an fp32 LayerNorm output on CUDA)
        w, b = like(w, dtype), like(b, dtype)
        z2 = z.reshape(-1, z.shape[-1])  # the 2-d matmuls nn.Linear runs on 3-d input, without its reshapes
        up = F.linear(self.dropout(F.linear(z2, wa, ba)), w, b)
        return (z2 + (up if self.scale == 1.0 else up * self.scale)).view(z.shape)

    def dense_up(self) -> torch.Tensor:
        """W_B as a dense (D, h) block-diagonal matrix."""
        return torch.block_diag(*self.up_weight.chunk(self.groups, 0))

    @torch.no_grad()
    def fold_into(self, original: nn.Module) -> nn.Module:
        """Fold into the Linear this adapter feeds; ``original`` (the LayerNorm before) is unchanged."""
        lin = self.__dict__.get("feeds")
        if not isinstance(lin, nn.Linear):
            raise NotMergeableError("repadapter: the Linear this adapter feeds is not a plain nn.Linear")
        wb = self.dense_up()
        m = torch.eye(wb.shape[0], dtype=wb.dtype, device=wb.device) + self.scale * wb @ self.down.weight
        c = self.scale * (wb @ self.down.bias + self.up_bias)
        w = lin.weight
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
        lin.bias.add_((w @ c.to(w.dtype)))
        w.copy_(w @ m.to(w.dtype))
        return original


@register_method("repadapter")
class RepAdapterMethod(Method):
    batched = "repadapter"  # parameters in two flat tensors, every W_B at once: methods/batched/repadapter.py

    def __init__(self, bottleneck: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.1,
                 placement: str = "block", blocks: Optional[str] = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"repadapter placement={placement!r}; choose block (official repblock) or attn (repattn)")
        self.bottleneck, self.groups, self.scale, self.dropout = int(bottleneck), int(groups), float(scale), float(dropout)
        self.placement, self.blocks = placement, blocks

    def inject(self, model: nn.Module) -> None:
        for b in block_names(model, self.blocks):
            for norm, feeds in PLACEMENTS[self.placement]:
                lin = model.get_submodule(f"{b}.{feeds}")
                if not isinstance(lin, nn.Linear):
                    raise ValueError(f"method repadapter: {b}.{feeds} is a {type(lin).__name__}, not a Linear")
                ada = RepAdapter(lin.in_features, self.bottleneck, self.groups, self.scale, self.dropout)
                ada.__dict__["feeds"] = lin  # a plain reference: merge folds the adapter into it
                insert_after(model, f"{b}.{norm}", ada)
