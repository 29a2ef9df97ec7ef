"""BitFit: only the bias terms train (Ben Zaken, Ravfogel and Goldberg, ACL 2022; official code
benzakenelad/BitFit, for BERT).

Nothing is added: the backbone's own bias vectors become trainable, with the classifier head.
The paper trains every bias term of the encoder, the LayerNorm biases included. The VTAB tables
that cite it for ViT (VPT's "Bias" row, reprinted by NOAH, SSF and later papers) come from VPT's
code (KMnP/vpt, ``src/models/vit_models.py``, transfer type ``tinytl-bias``), which trains every
backbone parameter whose name contains "bias": for ViT the same set as the paper's.

Here a bias is a parameter named ``bias`` of any module of the backbone (Linear, convolution,
LayerNorm), i.e. on ViT-B/16: per block norm1 768 + qkv 2,304 + proj 768 + norm2 768 + fc1 3,072
+ fc2 768 = 8,448; 12 · 8,448 + patch embedding 768 + final norm 768 = 102,912 without the head.
It applies unchanged to every family (DINOv2, CLIP, MAE, Swin: whatever biases the model has).
One difference from VPT's substring rule: Swin's relative-position bias tables
(``relative_position_bias_table``) are attention-logit offsets, not bias terms of a layer, and stay
frozen (``tables: true`` trains them too, as VPT's rule does).

The model computes exactly the backbone's outputs at start. Merging has nothing to fold: the
trained biases already sit in the plain model, which ``merge`` returns frozen.
"""
import torch.nn as nn

from .base import Method, register_method


@register_method("bitfit")
class BitFit(Method):
    def __init__(self, tables: bool = False):
        self.tables = bool(tables)

    def mark_trainable(self, model: nn.Module) -> None:
        super().mark_trainable(model)  # the head (and nothing else: BitFit adds no module)
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or (self.tables and leaf == "relative_position_bias_table"):
                p.requires_grad_(True)
