"""peft-vit: parameter-efficient fine-tuning of Vision Transformers on VTAB-1k and FGVC.

Public API::

    model = peft_vit.build_model(cfg)          # timm ViT + the method of cfg.method
    peft_vit.count_parameters(model)           # trainable (with / without head), total
    plain = peft_vit.merge(model)              # a plain timm ViT with the method folded in
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["build_model", "count_parameters", "merge", "METHODS", "get_method", "create_backbone"]
__version__ = "0.1.0"


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def __getattr__(name: str):
    """Lazy public API: importing ``peft_vit`` (e.g. for ``peft_vit.config`` in scripts) does not
    load torch and timm until a model-related name is used."""
    if name in ("count_parameters", "merge", "METHODS", "get_method"):
        from . import methods

        return getattr(methods, name)
    if name == "create_backbone":
        from .backbone import create_backbone

        return create_backbone
    raise AttributeError(f"module 'peft_vit' has no attribute {name!r}")


def build_model(cfg: Mapping) -> "nn.Module":
    """Backbone from ``cfg.model`` with the method of ``cfg.method`` injected and its trainable
    set marked. ``cfg`` is the composed Hydra config (or any mapping with ``model`` and
    ``method``). The model config's keys that :func:`~peft_vit.backbone.create_backbone` takes
    are passed as they are (its defaults live in ``configs/model/``; a mapping that leaves one
    out gets ``create_backbone``'s); the others (``normalize``) are the data's."""
    import inspect

    from .backbone import create_backbone
    from .methods import get_method

    mcfg = _plain(cfg["model"])
    takes = inspect.signature(create_backbone).parameters
    model = create_backbone(**{k: v for k, v in mcfg.items() if k in takes})
    method_cfg = _plain(cfg["method"])
    method = get_method(method_cfg.pop("name"), **method_cfg)
    return method.apply(model)
