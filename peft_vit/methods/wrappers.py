"""The modules a method adds to a backbone, and how each folds back into it.

* :class:`PeftModule`: marker base of every module a method adds; all its parameters train.
* :class:`Delta`: a method's update to one (block of a) frozen Linear, held by an
  :class:`AdaptedLinear`.
* :class:`InsertedAfter`, :class:`InsertedParallel` (with :class:`InputTap`): a method's module
  after, or beside, an existing one.

Each wrapper is :class:`Mergeable`: ``merge()`` returns the plain module that stands in for it
once the method is folded into the backbone's weights (``None``: nothing, it is removed), and
``mergeable`` says beforehand whether it can. :func:`~peft_vit.methods.merging.merge` walks the
model and asks each one; it knows no wrapper by name.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..precision import compute_dtype, like

__all__ = ["NotMergeableError", "Mergeable", "PeftModule", "Delta", "AdaptedLinear", "InsertedAfter", "InputTap",
           "InsertedParallel", "set_submodule"]


class NotMergeableError(RuntimeError):
    pass


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


class Mergeable:
    """The one interface :func:`~peft_vit.methods.merging.merge` uses."""

    # False: merge() would raise NotMergeableError; merge checks every module first, so a failed
    # merge leaves the model as it was
    mergeable: bool = True

    def merge(self) -> Optional[nn.Module]:
        """The plain module that stands in for this one after merging, or None to remove it."""
        raise NotImplementedError


class PeftModule(nn.Module):
    """Marker base: every parameter of a PeftModule is a method parameter and trains."""


class Delta(PeftModule):
    """A method's update to one (block of a) frozen Linear.

    Subclasses implement ``delta_weight`` (ΔW, shape (out, in)) and optionally ``delta_bias``;
    ``forward`` returns the additive output ``x ΔWᵀ (+ Δb)`` and should be overridden with a
    cheaper formulation that never forms ΔW. ``weight``/``bias`` are the frozen block's.
    """

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        out = F.linear(x, self.delta_weight(weight).to(x.dtype))
        db = self.delta_bias(bias)
        return out if db is None else out + db.to(out.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None


class AdaptedLinear(Mergeable, nn.Module):
    """A frozen ``nn.Linear`` plus one :class:`Delta` per adapted block.

    ``blocks`` maps a block name to its output rows ``(start, stop)``; the whole matrix is the
    block ``"all"``. With ``weight_space=True`` the forward builds ``W + ΔW`` and runs one
    matmul (cheaper for methods whose ΔW depends on W, such as RLRR); otherwise it adds the
    deltas' outputs to the frozen output (a block's with ``index_add`` on its rows), which needs
    no weight gradient at all.

    ``served_by``: ``None``, or ``(layer, index)`` when a batched layer (methods/batched) computes
    this Linear's update together with others; during the model's forward (``layer.active``) the
    Linear's output is ``layer.forward_linear(self, index, x)``, the same math in fewer ops.
    """

    def __init__(self, base: nn.Linear, weight_space: bool = False):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.deltas = nn.ModuleDict()
        self.slices: Dict[str, Tuple[int, int]] = {}
        self.weight_space = weight_space
        self.served_by: Optional[tuple] = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add(self, block: str, rows: Tuple[int, int], delta: Delta) -> None:
        if block in self.deltas:
            raise ValueError(f"block {block!r} of this Linear is already adapted")
        self.deltas[block] = delta
        self.slices[block] = rows
        if block != "all":  # where the block's output goes (no slicing of y, no cat)
            self.register_buffer(f"rows_{block}", torch.arange(*rows, device=self.base.weight.device), persistent=False)

    def _block(self, name: str):
        a, b = self.slices[name]
        w = self.base.weight[a:b]
        bias = None if self.base.bias is None else self.base.bias[a:b]
        return a, b, w, bias

    def merged_weight_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        w = self.base.weight
        b = self.base.bias
        dw = torch.zeros_like(w)
        db = None if b is None else torch.zeros_like(b)
        for name, delta in self.deltas.items():
            a, z, wb, bb = self._block(name)
            dw[a:z] = delta.delta_weight(wb).to(w.dtype)
            extra = delta.delta_bias(bb)
            if extra is not None:
                if db is None:
                    db = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                db[a:z] = extra.to(w.dtype)
        return w + dw, (b if db is None else (db if b is None else b + db))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under autocast the input in the compute dtype once, for the frozen matmul and the deltas
        # (an fp32 LayerNorm output on CUDA would be cast by each, or promote a delta's sum to fp32)
        x = like(x, compute_dtype(x))
        if self.served_by is not None and self.served_by[0].active:
            return self.served_by[0].forward_linear(self, self.served_by[1], x)
        if self.weight_space:
            w, b = self.merged_weight_bias()
            return F.linear(x, w, b)
        y = self.base(x)
        if len(self.deltas) == 1 and "all" in self.deltas:
            _, _, w, b = self._block("all")
            return y + self.deltas["all"](x, w, b)
        for name, delta in self.deltas.items():
            _, _, wb, bb = self._block(name)
            y = y.index_add(-1, getattr(self, f"rows_{name}"), delta(x, wb, bb))
        return y

    def merge(self) -> nn.Linear:
        w, b = self.merged_weight_bias()
        out = nn.Linear(self.in_features, self.out_features, bias=b is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if b is not None:
                out.bias.copy_(b)
        return out


class InsertedAfter(Mergeable, nn.Module):
    """``inserted(original(x))``: the result of :func:`~peft_vit.methods.targeting.insert_after`.

    An inserted module may define ``forward_after(original, x)`` to compute the composition
    itself, e.g. an affine folded into the LayerNorm it follows, on the fly (no extra activation),
    and ``fold_into(original)`` to merge (returning the folded ``original``); without it the
    composition cannot be merged.
    """

    def __init__(self, original: nn.Module, inserted: PeftModule):
        super().__init__()
        self.original = original
        self.inserted = inserted

    @property
    def mergeable(self) -> bool:
        return callable(getattr(self.inserted, "fold_into", None))

    def forward(self, x):
        fused = getattr(self.inserted, "forward_after", None)
        if fused is not None:
            return fused(self.original, x)
        return self.inserted(self.original(x))

    def merge(self) -> nn.Module:
        if not self.mergeable:
            raise NotMergeableError(
                f"{type(self.inserted).__name__} is a sequential module with a non-linearity and "
                "cannot be folded into the backbone's weights; keep the unmerged model")
        return self.inserted.fold_into(self.original)


class InputTap(Mergeable, nn.Module):
    """``original(x)``, remembering ``x`` for one :class:`InsertedParallel` that runs later in
    the same forward (the result of ``insert_parallel(..., input_of=name)``)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self._x: Optional[torch.Tensor] = None

    def forward(self, x, *args, **kwargs):
        self._x = x
        return self.original(x, *args, **kwargs)

    def take(self) -> Optional[torch.Tensor]:
        x, self._x = self._x, None
        return x

    def merge(self) -> nn.Module:
        return self.original


class InsertedParallel(Mergeable, nn.Module):
    """``original(x) + inserted(s)``: the result of :func:`~peft_vit.methods.targeting.insert_parallel`.
    ``s`` is ``x`` itself, or the input an :class:`InputTap` recorded earlier in the same forward."""

    mergeable = False

    def __init__(self, original: nn.Module, inserted: PeftModule, tap: Optional[InputTap] = None):
        super().__init__()
        self.original = original
        self.inserted = inserted
        # a plain reference, not a submodule: the tap already sits in the module tree
        self.__dict__["tap"] = tap

    def forward(self, x):
        src = x if self.tap is None else self.tap.take()
        if src is None:
            raise RuntimeError("insert_parallel: the tapped module did not run before this one")
        return self.original(x) + self.inserted(src)

    def merge(self) -> nn.Module:
        raise NotMergeableError(
            f"{type(self.inserted).__name__} is a parallel branch with a non-linearity and cannot "
            "be folded into the backbone's weights; keep the unmerged model")
