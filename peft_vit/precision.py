"""Mixed precision without per-step weight casts (issue 22).

Under ``torch.autocast`` a matmul or convolution runs in the compute dtype (bf16/fp16) whatever
its inputs' dtype: an fp32 weight is cast on every forward, one kernel per weight and bias per
step, though a frozen weight never changes. :func:`hold_frozen_weights` casts the frozen
backbone once, after the model is built; the loop (``set_up``) and ``scripts/benchmark.py --ops
--precision bf16`` call it, so the op count measures what the loop runs.

What is held in the compute dtype, and what stays fp32:

* **frozen backbone parameters** (Linear and Conv weights and biases, ``pos_embed``,
  ``cls_token``, LayerScale's γ): the projections would be cast by autocast anyway, and with
  ``pos_embed`` and ``cls_token`` in the compute dtype the token stream is in it too, so no
  activation is cast between blocks and no backward casts a gradient back (on CPU, where
  LayerNorm takes a bf16 input with fp32 weights natively, a block then runs without a single
  cast);
* **norm layers stay fp32**: on CUDA ``layer_norm`` is on autocast's fp32 list, so bf16 norm
  weights would be cast *up* on every step (there autocast casts the stream into each
  LayerNorm and its output into the next projection: activation casts that fp32 weights
  cost as well);
* **trainable parameters stay fp32**: they are the master copies AdamW updates (a trainable
  bias of a frozen Linear, BitFit's, stays fp32 too); where one meets an activation it is cast
  once per step and use (:func:`like` with :func:`compute_dtype`), and a batched plan casts
  its stacked factors once per step, not per layer
  (:class:`~peft_vit.methods.batched.BatchedDeltas`);
* **a method's frozen tensors are buffers** (VeRA's shared projections), left as they are: they
  feed the factor math, which runs in fp32.

A method's fp32 tensor that meets a bf16 activation in an op autocast does not cover (an
element-wise scale or shift, a cat) would promote the activation to fp32, and every op after
it; it is cast to the activation's dtype first (to the compute dtype where it meets a matmul).

Merging never reads a model held this way: ``scripts/export_merged.py`` builds the model afresh
in fp32 and loads the trained (fp32) parameters, and
:func:`~peft_vit.methods.merging.merge` refuses a model whose frozen weights are held in a
lower precision (:func:`held_dtype`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["hold_frozen_weights", "held_dtype", "compute_dtype", "like", "matmul_operand"]

_NORMS = (nn.modules.normalization.LayerNorm, nn.modules.normalization.GroupNorm, nn.modules.batchnorm._NormBase,
          nn.modules.normalization.RMSNorm)


def _frozen_backbone(model: nn.Module):
    """The frozen floating parameters held in the compute dtype: every one but a norm layer's.
    A method's own frozen tensors are buffers (VeRA's shared projections, the batched layer's
    one-hot maps), which are not held: they feed the factor math, which runs in fp32 (every
    parameter of a method module trains, ``Method.mark_trainable``)."""
    for mod in model.modules():
        if not isinstance(mod, _NORMS):
            for p in mod.parameters(recurse=False):
                if not p.requires_grad and p.is_floating_point():
                    yield p


def hold_frozen_weights(model: nn.Module, dtype: Optional[torch.dtype]) -> int:
    """Hold the frozen backbone parameters of ``model`` (all but the norm layers'; see the
    module's docstring) in ``dtype``, the autocast compute dtype (``None`` or fp32: nothing
    changes), in place: the same ``Parameter`` objects, so references to them stay valid.
    Returns the number of tensors cast."""
    if dtype is None or dtype == torch.float32:
        return 0
    n = 0
    with torch.no_grad():
        for p in _frozen_backbone(model):
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += 1
    return n


def held_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The lower precision the frozen backbone of ``model`` is held in, or ``None`` (fp32)."""
    return next((p.dtype for p in _frozen_backbone(model) if p.dtype != torch.float32), None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x``'s matmuls run in: autocast's while it is on for ``x``'s device, else ``x``'s."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself (no op at all) when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def matmul_operand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` to meet ``x`` in a matmul: as it is under autocast (autocast casts a trainable leaf
    parameter once per forward and reuses the cast: a factor shared by many layers is cast
    once, where an explicit ``.to`` per use would cast it per layer), else in ``x``'s dtype."""
    return t if torch.is_autocast_enabled(x.device.type) else like(t, x.dtype)
