"""Full fine-tuning: every parameter of the backbone and the head trains."""
import torch.nn as nn

from .base import Method, register_method


@register_method("full")
class FullFineTune(Method):
    def __init__(self):
        pass

    def mark_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(True)
