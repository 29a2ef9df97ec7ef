"""LayerNorm tuning: only the affine parameters (γ, β) of the backbone's LayerNorms train, with the
classifier head. The unified study of PEFT in vision (Mai et al., "Lessons Learned from a Unifying
Empirical Study of Parameter-Efficient Transfer Learning (PETL) in Visual Recognition", CVPR 2025;
code OSU-MLB/ViT_PEFT_Vision, ``experiment/build_model.py``: ``params.ln`` adds every parameter
whose name contains ``norm`` to the tuned set) runs it as a baseline; LayerNorm tuning as a PEFT
method for ViTs is Basu et al., "Strong Baselines for Parameter-Efficient Few-Shot Fine-Tuning"
(AAAI 2024), and for transformers in general Zhao et al., "Tuning LayerNorm in Attention" (2023).

Nothing is added. Here a LayerNorm is every ``nn.LayerNorm`` module of the backbone (the study's
name rule picks the same modules on its ViT: ``norm1``, ``norm2`` of each block and the final
``norm``; on other families also ``norm_pre`` (CLIP), ``fc_norm`` (MAE) and Swin's patch-embedding
and patch-merging norms, which a name rule would pick as well).

ViT-B/16: 12 blocks · 2 norms · 2 · 768 + final norm 2 · 768 = 36,864 + 1,536 = 38,400 without the
head. The model computes exactly the backbone's outputs at start; merging has nothing to fold (the
tuned affines already sit in the plain model, which ``merge`` returns frozen).
"""
import torch.nn as nn

from .base import Method, register_method


def train_layernorms(model: nn.Module) -> None:
    """Make the weight and bias of every ``nn.LayerNorm`` of ``model`` trainable (also DiffFit's)."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.requires_grad_(True)


@register_method("ln_tune")
class LNTune(Method):
    def __init__(self):  # no options: the trainable set is fixed
        pass

    def mark_trainable(self, model: nn.Module) -> None:
        super().mark_trainable(model)  # the head (LN tuning adds no module)
        train_layernorms(model)
