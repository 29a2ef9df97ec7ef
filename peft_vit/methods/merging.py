"""Folding a method into the backbone's weights, and counting parameters.

:func:`merge` knows no wrapper by name: it walks the model, deepest module first, and asks every
:class:`~peft_vit.methods.wrappers.Mergeable` for the module that stands in for it
(``merge()``; ``None``: removed, e.g. a batched layer or a parameter pack, which go last since
the folds read them). Modules a method swapped in without parameters (e.g. RLRR's residual
dropout) name their plain stand-in via ``merged_replacement()``.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn as nn

from ..precision import held_dtype
from .wrappers import Mergeable, NotMergeableError, PeftModule, set_submodule

__all__ = ["merge", "count_parameters"]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every method module into plain weights, in place; returns the model.

    The result has the backbone's class and no extra modules. Raises NotMergeableError for
    methods that cannot be folded (sequential adapters with a non-linearity), and ValueError for a
    model whose frozen weights the loop holds in bf16/fp16 (merged weights come from fp32 ones).
    """
    _check_mergeable(model)
    held = held_dtype(model)
    if held is not None:
        raise ValueError(f"merge: the frozen weights of this model are held in {held} for mixed-precision training "
                         f"(peft_vit/precision.py); a merged model must come from the fp32 weights: build the model "
                         f"afresh and load the trained parameters (scripts/export_merged.py does)")
    todo = [(n, m) for n, m in model.named_modules() if n and isinstance(m, Mergeable)]
    removed = []
    # deepest first, so inner wrappers are folded before an outer one reads them
    for n, m in sorted(todo, key=lambda t: -t[0].count(".")):
        stand_in = m.merge()
        if stand_in is None:
            removed.append(n)
        else:
            set_submodule(model, n, stand_in)
    for n in removed:  # shared state (packs, batched layers) served the folds above
        parent_name, _, attr = n.rpartition(".")
        delattr(model.get_submodule(parent_name) if parent_name else model, attr)
    for n, m in list(model.named_modules()):
        plain = getattr(m, "merged_replacement", None)
        if callable(plain) and n:
            set_submodule(model, n, plain())
    leftovers = [n for n, m in model.named_modules() if isinstance(m, PeftModule)]
    if leftovers:
        raise NotMergeableError(f"modules left after merge: {leftovers[:5]}")
    if hasattr(model, "peft_method"):
        del model.peft_method
    model.requires_grad_(False)
    return model


def _check_mergeable(model: nn.Module) -> None:
    """Raise before touching anything when some method module cannot be folded, so a failed
    merge leaves the model as it was."""
    bad = [n for n, m in model.named_modules() if isinstance(m, Mergeable) and not m.mergeable]
    method = getattr(model, "peft_method", None)
    if bad or (method is not None and not getattr(method, "mergeable", True)):
        name = getattr(method, "name", None) or "this method"
        where = f" ({len(bad)} modules, e.g. {bad[0]})" if bad else ""
        raise NotMergeableError(
            f"method {name!r} is not mergeable: it inserts non-linear modules{where} that cannot be "
            "folded into the backbone's weights; evaluate or export the unmerged model instead")


def _head_params(model: nn.Module) -> Iterable[nn.Parameter]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return list(head.parameters()) if isinstance(head, nn.Module) else []


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """``trainable_params`` (incl. head), ``trainable_params_no_head`` and ``total_params``."""
    head_ids = {id(p) for p in _head_params(model)}
    seen = set()
    total = trainable = trainable_head = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            if id(p) in head_ids:
                trainable_head += p.numel()
    return {
        "trainable_params": trainable,
        "trainable_params_no_head": trainable - trainable_head,
        "total_params": total,
    }
