"""DiffFit (Xie, Chen, Xie, Li, Ju, Li and Gao, "DiffFit: Unlocking Transferability of Large
Diffusion Models via Simple Parameter-Efficient Fine-Tuning", ICCV 2023): the bias terms, the
LayerNorms and a learned per-channel scale γ on each residual branch of every block train::

    x = x + γ₁ ⊙ DropPath(Attn(LN1(x))),    x = x + γ₂ ⊙ DropPath(MLP(LN2(x))),   γ₁, γ₂ ∈ R^D, init 1

(the paper's Algorithm 1 on DiT; for ViT classification the unified PEFT study runs it the same way:
OSU-MLB/ViT_PEFT_Vision, ``model/block.py`` ``difffit_gamma1/2`` initialised to ones, and
``experiment/build_model.py``, which adds ``bias`` and ``norm`` parameters to the tuned set).

Choices where the paper (written for DiT) is silent, as the unified study runs it on ViT:

* γ in every block (``blocks`` selects others); the paper studies γ's placement on DiT's blocks
  only.
* the biases are every parameter named ``bias`` (BitFit's set, bitfit.py); the LayerNorms every
  ``nn.LayerNorm`` (ln_tune.py). DiT's class-embedding table has no ViT counterpart.
* γ sits at ``attn.proj`` / ``mlp.fc2``'s output: γ ⊙ DropPath(LS(proj(z))) = DropPath(LS(γ ⊙
  proj(z))) since drop-path, dropout and layer scale act per sample or per channel; on Swin the
  window reverse and roll only permute tokens. So the model starts as the backbone and γ folds
  exactly into those Linears' rows at merge (``W ← diag(γ) W``, ``b ← γ b``).

ViT-B/16: biases 102,912 (bitfit) + LayerNorm weights 12 · 2 · 768 + 768 = 19,200 + γ 12 · 2 · 768
= 18,432 → 140,544 without the head. All are 1-d, so timm's rule exempts them from weight decay.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..precision import like
from .base import Method, NotMergeableError, PeftModule, block_names, insert_after, register_method
from .ln_tune import train_layernorms

SITES = ("attn.proj", "mlp.fc2")  # the last Linear of each residual branch


class ChannelScale(PeftModule):
    """``y ⊙ γ`` over the last dimension, γ initialised to ones; folds into the Linear before it."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * like(self.gamma, y.dtype)  # not promoting a bf16 activation (precision.py)

    @torch.no_grad()
    def fold_into(self, original: nn.Module) -> nn.Module:
        if not isinstance(original, nn.Linear):
            raise NotMergeableError(f"difffit: γ cannot be folded into a {type(original).__name__}")
        original.weight.mul_(self.gamma.to(original.weight.dtype)[:, None])
        if original.bias is not None:
            original.bias.mul_(self.gamma.to(original.bias.dtype))
        return original


@register_method("difffit")
class DiffFit(Method):
    batched = "difffit"  # every γ in one trainable tensor: methods/batched/difffit.py

    def __init__(self, blocks: Optional[str] = None):
        self.blocks = blocks

    def inject(self, model: nn.Module) -> None:
        for b in block_names(model, self.blocks):
            for s in SITES:
                lin = model.get_submodule(f"{b}.{s}")
                if not isinstance(lin, nn.Linear):
                    raise ValueError(f"method difffit: {b}.{s} is a {type(lin).__name__}, not the Linear that ends a "
                                     "residual branch; set method.blocks to the transformer blocks' names")
                insert_after(model, f"{b}.{s}", ChannelScale(lin.out_features))

    def mark_trainable(self, model: nn.Module) -> None:
        super().mark_trainable(model)  # γ and the head
        train_layernorms(model)
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
