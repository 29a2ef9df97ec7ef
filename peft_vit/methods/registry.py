"""The method registry: :class:`Method`, :func:`register_method`, :func:`get_method`.

A method is a subclass of :class:`Method`, registered by name with :func:`register_method`; it
takes its config keys as constructor arguments and implements :meth:`Method.inject` with the
placement helpers of :mod:`~peft_vit.methods.targeting`. That is all a method needs.

A method may also name a batched plan (``batched = "<plan>"``, methods/batched/<plan>.py) that
runs its modules together in fewer ops; the plan is applied after ``inject`` and changes no
result (tests/conftest.py ``assert_batched_equals_one_by_one``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Set, Type

import torch.nn as nn

from ..errors import PeftVitError
from .wrappers import PeftModule

__all__ = ["METHODS", "Method", "register_method", "get_method", "default_no_weight_decay",
           "UnsupportedBackboneError"]

METHODS: Dict[str, Type["Method"]] = {}


class UnsupportedBackboneError(PeftVitError, ValueError):
    """A method cannot apply to a backbone family (e.g. VPT's prompt tokens and Swin's windows)."""


class Method:
    """Base class of a PEFT method. A subclass sets ``name`` (via :func:`register_method`),
    takes its config keys as constructor arguments and implements :meth:`inject`."""

    name: str = ""
    mergeable: bool = True
    # the batched plan (methods/batched/<plan>.py) that runs this method's modules together, or
    # None: every module runs on its own (what a new method starts with)
    batched: Optional[str] = None

    def inject(self, model: nn.Module) -> None:
        """Modify ``model`` in place: wrap Linears, insert modules."""

    def mark_trainable(self, model: nn.Module) -> None:
        """Default trainable set: every PeftModule parameter plus the classifier head."""
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, PeftModule):
                m.requires_grad_(True)
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if isinstance(head, nn.Module):
            head.requires_grad_(True)

    def no_weight_decay(self, model: nn.Module) -> Set[str]:
        """Names of the trainable parameters the optimiser must not decay (the rest decay by
        ``optim.weight_decay``); ``build_optimizer`` asks the method. Default: timm's rule, i.e.
        1-d tensors, biases and the backbone's own ``no_weight_decay()`` names. A method
        overrides it to follow its paper's or code's groups (rlrr.py, householder.py)."""
        return default_no_weight_decay(model)

    def report(self, model: nn.Module) -> dict:
        """Called once at the end of a run: method diagnostics for results.json (under the
        method's name), JSON-able data only; figures of it are drawn by ``peft_vit.report.plots``
        (:func:`~peft_vit.report.plots.plot_run`). Default: nothing."""
        return {}

    def apply(self, model: nn.Module) -> nn.Module:
        self.inject(model)
        if self.batched is not None:
            from .batched import apply_plan

            apply_plan(self.batched, model, self)
        self.mark_trainable(model)
        model.peft_method = self  # plain attribute (not a submodule): the loop asks it for report()
        return model


def default_no_weight_decay(model: nn.Module) -> Set[str]:
    """timm's rule (``param_groups_weight_decay``): the trainable 1-d tensors, ``*.bias`` and the
    backbone's ``no_weight_decay()`` names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return {n for n, p in model.named_parameters()
            if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias") or n in skip)}


def register_method(name: str) -> Callable[[Type[Method]], Type[Method]]:
    def deco(cls: Type[Method]) -> Type[Method]:
        if name in METHODS:
            raise KeyError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def get_method(name: str, **kwargs) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"method {name!r}: bad config keys ({e})") from e
