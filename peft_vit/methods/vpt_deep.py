"""VPT-deep: Visual Prompt Tuning (Jia, Tang, Chen, Cardie, Belongie, Hariharan and Lim, ECCV
2022; official code: github.com/KMnP/vpt, ``src/models/vit_prompt/vit.py``).

Each transformer block l gets its own p learnable prompt tokens P_l ∈ R^{p×D}. They are placed
after the prefix tokens (class, and register tokens where the backbone has them:
``model.num_prefix_tokens``) at the block's input, and their outputs are dropped after the block::

    [c', _, e'] = Block_l([c, Dropout(P_l), e])      c: prefix tokens, e: patch tokens

so the next block sees [c', e'] plus its own fresh P_{l+1}. Prompts get no position embedding; the
head reads the backbone's pooled output as usual (the class token for ViT-B/16). Default: p = 10
on every block, 12 · 10 · 768 = 92,160 parameters on ViT-B/16 (without head).

``deep=False`` is VPT-shallow: one set of prompts before the first block, kept through every block
and dropped after the last one (10 · 768 = 7,680 on ViT-B/16).

Choices where the paper is silent, taken from the official code:

* init: uniform(-v, v) with v = sqrt(6 / (3·h·w + D)) for an h×w patch (a xavier-uniform bound with
  the patch embedding's fan-in; 0.0625 on ViT-B/16). Not the identity at start.
* ``dropout`` 0.1 on the prompts (an independent mask per sample): the value of every VTAB launch
  command in the official ``demo.ipynb``, which states they use the paper's hyper-parameters. The
  same notebook's generic VPT-deep template and the config default (``src/configs/config.py``)
  say 0.0; ``dropout=0`` gives that.
* The paper tunes p per task ({1, 5, 10, 50, 100, 200}); 10 is the default here, set
  ``num_tokens`` per task to reproduce its per-task choices.
* After the last block the official code keeps the prompts through the final LayerNorm and then
  reads the class token; a LayerNorm acts per token, so dropping them first gives the same
  output, and an average-pooling head then pools the patch tokens only.
* The official code keeps the backbone in eval mode while training (no backbone dropout or drop
  path); here the backbone's drop path is the model config's ``drop_path_rate`` (0 matches it).
* A backbone with a pre-norm (CLIP's ``norm_pre``) gets the first prompts after it, at the input
  of the first block, where every later block gets its own.

Placing prompts needs a flat token sequence with prefix tokens: timm ``VisionTransformer`` (ViT,
DINOv2, CLIP, MAE). Swin's windowed attention has neither; the paper's Swin variant (prompts per
window) is out of scope, and Swin raises :class:`UnsupportedBackboneError`. Prompts cannot be
folded into weights: not mergeable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..precision import like
from .base import Method, PeftModule, UnsupportedBackboneError, backbone_family, block_names, register_method
from .base import _set_submodule


class Prompts(PeftModule):
    """``num_tokens`` prompt tokens of width ``dim``, uniform(-bound, bound), with dropout."""

    def __init__(self, num_tokens: int, dim: int, bound: float, dropout: float):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The prompts of ``batch`` samples, in ``dtype`` (the tokens' they join: a bf16 stream
        under autocast is not promoted to fp32 by the cat; peft_vit/precision.py)."""
        return self.dropout(like(self.tokens, dtype or self.tokens.dtype).expand(batch, -1, -1))


class PromptedBlock(nn.Module):
    """A transformer block that inserts ``prompts`` after the ``prefix`` tokens of its input (when
    it has prompts) and drops the ``num_tokens`` prompt outputs after it (when ``drop``)."""

    def __init__(self, original: nn.Module, prompts: Prompts | None, prefix: int, num_tokens: int, drop: bool):
        super().__init__()
        self.original = original
        self.prompts = prompts
        self.prefix, self.num_tokens, self.drop = prefix, num_tokens, drop

    def forward(self, x: torch.Tensor, attn_mask=None, **kwargs) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("vpt_deep: an attention mask over the image tokens does not cover the prompt "
                             "tokens; call the model without attn_mask")
        p = self.prefix
        if self.prompts is not None:
            x = torch.cat([x[:, :p], self.prompts(x.shape[0], x.dtype), x[:, p:]], dim=1)
        x = self.original(x, **kwargs)
        if self.drop:
            x = torch.cat([x[:, :p], x[:, p + self.num_tokens:]], dim=1)
        return x


@register_method("vpt_deep")
class VPTDeep(Method):
    mergeable = False

    def __init__(self, num_tokens: int = 10, dropout: float = 0.1, deep: bool = True):
        if int(num_tokens) < 1:
            raise ValueError(f"vpt_deep num_tokens={num_tokens}; need at least 1 prompt token")
        self.num_tokens = int(num_tokens)
        self.dropout = float(dropout)
        self.deep = bool(deep)

    def inject(self, model: nn.Module) -> None:
        family = backbone_family(model)
        if family != "vit":
            why = ("its windowed attention has no global token sequence and no class token; VPT's "
                   "per-window Swin variant is not implemented") if family == "swin" else \
                "prompts need timm's VisionTransformer token layout (prefix tokens, then patches)"
            raise UnsupportedBackboneError(
                f"method 'vpt_deep' does not apply to the {family!r} backbone family: {why}; "
                "use a method that adapts the Linears (e.g. lora) or the blocks (adapter)")
        dim = model.embed_dim
        h, w = model.patch_embed.patch_size
        bound = math.sqrt(6.0 / (3 * h * w + dim))
        prefix = int(model.num_prefix_tokens)
        names = block_names(model)
        for i, name in enumerate(names):
            # deep: own prompts in, out after every block; shallow: in before the first, out after the last
            prompts = Prompts(self.num_tokens, dim, bound, self.dropout) if self.deep or i == 0 else None
            drop = self.deep or i == len(names) - 1
            block = PromptedBlock(model.get_submodule(name), prompts, prefix, self.num_tokens, drop)
            _set_submodule(model, name, block)
