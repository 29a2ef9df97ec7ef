"""The batched layer: a method's modules run together, in fewer ops, with the same math.

A method opts in by naming a plan (``batched = "<plan>"`` on its :class:`Method` class); after
``inject``, :func:`apply_plan` calls ``apply(model, method)`` of ``methods/batched/<plan>.py``.
A method without a plan runs each module on its own, which is what a method's file computes.

A plan uses two tools:

* :class:`ParamPack`: the parameters of many modules in a few flat tensors, so that a training
  step updates a few large tensors instead of hundreds of small ones (each costs the optimiser a
  few kernel launches), and the same parameter of many modules is one contiguous view that
  batched math reads with no stack or copy. A packed module reads its parameters under their own
  names, as views into the pack.
* :class:`BatchedDeltas`: computes the parameter-side factors of many adapted Linears at once,
  once per forward of the model, and serves each Linear's output from them
  (``AdaptedLinear.served_by``).

Weight files do not see any of this: they hold one tensor per module and parameter
(:mod:`peft_vit.methods.weights`).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...precision import like
from ..wrappers import AdaptedLinear, Mergeable, PeftModule

__all__ = ["ParamPack", "pack_parameters", "BatchedDeltas", "attach_batched", "block_onehot", "low_rank_output",
           "apply_plan", "linear_units", "ordered_deltas", "pack_modules"]


def apply_plan(plan: str, model: nn.Module, method) -> None:
    """Run ``methods/batched/<plan>.py``'s ``apply(model, method)`` (after ``method.inject``)."""
    try:
        module = importlib.import_module(f"{__name__}.{plan}")
    except ModuleNotFoundError as e:
        raise ValueError(f"method {method.name!r} names the batched plan {plan!r}, but there is no "
                         f"peft_vit/methods/batched/{plan}.py; set batched = None to run its modules one by one") from e
    module.apply(model, method)


_PACKED: Dict[Tuple[type, Tuple[str, ...]], type] = {}


def _packed_class(cls: type, names: Sequence[str]) -> type:
    """``cls`` with a read-only property per packed parameter name, returning the module's view
    into its pack (the idiom of ``torch.nn.utils.parametrize``: the class of a module whose
    tensors are computed on read)."""
    key = (cls, tuple(sorted(names)))
    if key not in _PACKED:
        props = {n: property(lambda self, n=n: self.packed_in[0].read(self.packed_in[1][n]),
                             doc=f"``{n}``: a view into this module's ParamPack") for n in names}
        _PACKED[key] = type(cls.__name__, (cls,), dict(props, __module__=cls.__module__, __doc__=cls.__doc__,
                                                       __qualname__=cls.__qualname__))
    return _PACKED[key]


class ParamPack(Mergeable, PeftModule):
    """The parameters of many method modules in one flat tensor per parameter name (``v_l``
    holds the ``v_l`` of every packed module).

    ``units`` is a list of module lists; the modules of one unit share class, parameter names and
    shapes. A 1-d parameter stays 1-d and any other is stored as (n, 1), so that the optimiser's
    usual rule (no weight decay on 1-d tensors and biases) and AdamW's element-wise update treat
    every value exactly as before packing. With ``label`` all 1-d parameters share one tensor
    named ``label`` and all others one named ``label_matrix``. With ``group(module, name)`` each
    stored name gets the suffix ``_<group>``, so parameters the optimiser must treat apart (e.g.
    decayed or not) live in separate tensors.

    A packed module keeps its class's behaviour: its class becomes a subclass with one property
    per packed name (``delta.v_l``), a view of the pack; during the model's forward (while a
    :class:`BatchedDeltas` holds the pack's split, :attr:`current`) a module alone in its unit
    reads the split itself, with no further op."""

    def __init__(self, units: Sequence[Sequence[nn.Module]], label: Optional[str] = None,
                 group: Optional[Callable[[nn.Module, str], str]] = None):
        super().__init__()
        self.slots: Dict[Tuple[int, str], Tuple[str, int, int, Tuple[int, ...]]] = {}
        self.members: List[List[nn.Module]] = [list(mods) for mods in units]  # plain references
        self.current: Optional[Dict[Tuple[int, str], torch.Tensor]] = None
        parts: Dict[str, List[torch.Tensor]] = {}
        ndim: Dict[str, int] = {}
        for u, mods in enumerate(units):
            names = [n for n, _ in mods[0].named_parameters(recurse=False)]
            for n in names:
                ps = [m._parameters[n] for m in mods]
                shape = tuple(ps[0].shape)
                if any(tuple(p.shape) != shape or type(m) is not type(mods[0]) for p, m in zip(ps, mods)):
                    raise ValueError(f"ParamPack: unit {u} mixes classes or shapes of {n!r}")
                flat = len(shape) <= 1 or n == "bias"
                store = n if label is None else (label if flat else f"{label}_matrix")
                if group is not None:
                    store = f"{store}_{group(mods[0], n)}"
                if ndim.setdefault(store, 1 if flat else 2) != (1 if flat else 2):
                    raise ValueError(f"ParamPack: {n!r} is 1-d in one unit and not in another")
                chunk = parts.setdefault(store, [])
                self.slots[(u, n)] = (store, sum(t.numel() for t in chunk), len(mods), shape)
                chunk += [p.detach().reshape(-1) for p in ps]
            for i, m in enumerate(mods):
                for n in names:
                    del m._parameters[n]
                m.__class__ = _packed_class(type(m), names)
                m.__dict__["packed_in"] = (self, {n: (u, n, i) for n in names})
        for n, ts in parts.items():
            t = torch.cat(ts)
            self.register_parameter(n, nn.Parameter(t if ndim[n] <= 1 else t.unsqueeze(1)))

    def unpack(self, dtype: Optional[torch.dtype] = None) -> Dict[Tuple[int, str], torch.Tensor]:
        """Every slot as a flat (count·numel,) view: one split per stored tensor (during the
        model's forward, the split already made: :attr:`current`); with ``dtype``, of the stored
        tensor cast once to it."""
        if self.current is not None:
            return self.current
        out: Dict[Tuple[int, str], torch.Tensor] = {}
        for store, p in self._parameters.items():
            keys = sorted((k for k, v in self.slots.items() if v[0] == store), key=lambda k: self.slots[k][1])
            sizes = [self.slots[k][2] * math.prod(self.slots[k][3]) for k in keys]
            flat = p if p.dim() == 1 else p.view(-1)
            flat = flat if dtype is None else like(flat, dtype)
            out.update(zip(keys, flat.split(sizes) if len(keys) > 1 else [flat]))
        return out

    def stacked(self, unit: int, name: str) -> torch.Tensor:
        """Parameter ``name`` of every module of ``unit``: a (count, *shape) view."""
        store, off, count, shape = self.slots[(unit, name)]
        return self._parameters[store].view(-1)[off:off + count * math.prod(shape)].view(count, *shape)

    def read(self, where: Tuple[int, str, int]) -> torch.Tensor:
        """Parameter ``name`` of module ``i`` of ``unit``: a view into the pack."""
        unit, name, i = where
        if self.current is not None and self.slots[(unit, name)][2] == 1:
            v, shape = self.current[(unit, name)], self.slots[(unit, name)][3]
            return v if tuple(v.shape) == shape else v.view(shape)
        return self.stacked(unit, name)[i]

    def layers(self) -> Iterable[Tuple[nn.Module, str, torch.Tensor]]:
        """``(module, parameter name, view)`` for every packed parameter (the weight files' view)."""
        for (u, n) in self.slots:
            stacked = self.stacked(u, n)
            for i, m in enumerate(self.members[u]):
                yield m, n, stacked[i]

    def members_of(self, store: str) -> List[Tuple[nn.Module, str]]:
        """The ``(module, parameter name)`` pairs held by the stored tensor ``store``."""
        return [(m, n) for (u, n), v in self.slots.items() if v[0] == store for m in self.members[u]]

    def merge(self) -> None:
        return None  # the folded modules read it; nothing stands in for it


def pack_parameters(owner: nn.Module, units: Sequence[Sequence[nn.Module]], name: str = "pack",
                    label: Optional[str] = None,
                    group: Optional[Callable[[nn.Module, str], str]] = None) -> ParamPack:
    """Move the parameters of ``units`` into one :class:`ParamPack`, registered as ``owner.name``."""
    pack = ParamPack(units, label, group)
    owner.add_module(name, pack)
    return pack


def block_onehot(lin: AdaptedLinear) -> Tuple[torch.Tensor, int]:
    """Where the adapted blocks of a fused Linear sit: a (G, NB) one-hot matrix (row g: the g-th
    adapted block in row order, column: its slot among the NB equal blocks) and the block size.
    Batched deltas scatter their G block updates into the whole output with it, without slicing."""
    keys = sorted(lin.deltas, key=lambda k: lin.slices[k][0])
    size = lin.slices[keys[0]][1] - lin.slices[keys[0]][0]
    onehot = torch.zeros(len(keys), lin.out_features // size, device=lin.base.weight.device)
    for g, k in enumerate(keys):
        onehot[g, lin.slices[k][0] // size] = 1.0
    return onehot, size


def ordered_deltas(lin: AdaptedLinear) -> List[nn.Module]:
    """The deltas of ``lin`` in output-row order."""
    return [lin.deltas[k] for k in sorted(lin.deltas, key=lambda k: lin.slices[k][0])]


def linear_units(model: nn.Module, delta_cls: type,
                 key: Optional[Callable[[AdaptedLinear], Hashable]] = None) -> List[List[AdaptedLinear]]:
    """The Linears adapted only by ``delta_cls``, grouped into units that batched math can stack:
    same adapted blocks, weight shape and parameter shapes (e.g. the q+v ``attn.qkv`` of every
    layer), in model order; ``key(linear)``, when given, must match too (a delta's setting that
    its shapes do not show, e.g. FacT-TK's MLP core layout)."""
    units: Dict[tuple, List[AdaptedLinear]] = {}
    for mod in model.modules():
        if isinstance(mod, AdaptedLinear) and mod.deltas and all(isinstance(d, delta_cls) for d in mod.deltas.values()):
            params = tuple((n, tuple(p.shape)) for d in ordered_deltas(mod) for n, p in d.named_parameters(recurse=False))
            group = (tuple(sorted(mod.slices.values())), tuple(mod.base.weight.shape), params,
                     None if key is None else key(mod))
            units.setdefault(group, []).append(mod)
    return list(units.values())


class BatchedDeltas(Mergeable, nn.Module):
    """Computes the parameter-side factors of many :class:`AdaptedLinear` s together (across
    blocks of a fused projection and across layers), once per forward of the model, in a handful
    of batched ops instead of a small graph per matrix.

    Attached with :func:`attach_batched`: a forward pre-hook of the model splits its ``packs``
    (:attr:`ParamPack.current`) and calls :meth:`compute`, whose result holds for that forward;
    each of its ``linears`` then calls :meth:`forward_linear` with its index. A Linear called on
    its own (outside the model's forward) finds no factors and runs its deltas one by one: the
    same math.

    Under autocast (issue 22; peft_vit/precision.py) :meth:`compute` runs with autocast off, in
    fp32 from the fp32 master parameters (orthogonal products keep their orthogonality to fp32
    precision), and casts its stacked results to the compute dtype once (:meth:`cast`), before
    splitting them per Linear: one cast per factor tensor per step, not per layer. A plan
    whose factors are the packs' views themselves (``cast_packs = True``: SSF, RLRR's scales)
    has each pack cast once instead, before its split."""

    cast_packs = False

    def __init__(self, linears: Sequence[AdaptedLinear] = (), packs: Sequence[ParamPack] = ()):
        super().__init__()
        self._cache: Optional[List] = None
        self.dtype: Optional[torch.dtype] = None  # the autocast compute dtype during a forward
        self.packs = list(packs)  # plain references: the packs are registered where they belong
        self.handles: tuple = ()
        for i, lin in enumerate(linears):
            lin.served_by = (self, i)

    @property
    def active(self) -> bool:
        return self._cache is not None

    def compute(self) -> List:
        return []

    def forward_linear(self, lin: AdaptedLinear, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cast(self, *tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        """``tensors`` in the compute dtype of this forward (as they are outside autocast)."""
        return tensors if self.dtype is None else tuple(None if t is None else like(t, self.dtype) for t in tensors)

    def refresh(self, device_type: str = "cpu") -> None:
        self.dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        for pack in self.packs:
            pack.current = None
            pack.current = pack.unpack(self.dtype if self.cast_packs else None)
        if self.dtype is None or self.cast_packs:
            self._cache = self.compute()
        else:
            with torch.autocast(device_type, enabled=False):
                self._cache = self.compute()

    def clear(self) -> None:
        for pack in self.packs:
            pack.current = None
        self._cache = None
        self.dtype = None

    def merge(self) -> None:
        for handle in self.handles:
            handle.remove()
        return None


def low_rank_output(lin: AdaptedLinear, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                    input_dropout: Optional[nn.Module] = None, inner_dropout: Optional[nn.Module] = None
                    ) -> torch.Tensor:
    """``lin.base(x) + inner_dropout(input_dropout(x) @ left) @ right``, one ``addmm`` over the
    flattened tokens: a Linear whose batched update is a product of two factors (fact_tk, vera)."""
    left, right = like(left, x.dtype), like(right, x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    h = (x2 if input_dropout is None else input_dropout(x2)) @ left
    y = torch.addmm(lin.base(x2), h if inner_dropout is None else inner_dropout(h), right)
    return y.view(*x.shape[:-1], y.shape[-1])


def _refresh_batched(model: nn.Module, args) -> None:
    device_type = args[0].device.type if args and isinstance(args[0], torch.Tensor) else "cpu"
    for m in model.children():
        if isinstance(m, BatchedDeltas):
            m.refresh(device_type)


def _clear_batched(model: nn.Module, args, output) -> None:
    for m in model.children():
        if isinstance(m, BatchedDeltas):
            m.clear()


def attach_batched(model: nn.Module, name: str, batched: BatchedDeltas) -> BatchedDeltas:
    """Register ``batched`` as ``model.name`` and, once per model, the hooks that refresh every
    batched layer before the model's forward and clear it after (merging removes them)."""
    others = [m for m in model.children() if isinstance(m, BatchedDeltas)]
    model.add_module(name, batched)
    if others:
        batched.handles = others[0].handles
    else:
        batched.handles = (model.register_forward_pre_hook(_refresh_batched),
                           model.register_forward_hook(_clear_batched, always_call=True))
    return batched


def pack_modules(model: nn.Module, modules: Sequence[nn.Module], name: str, label: Optional[str] = None) -> ParamPack:
    """The plan of a method whose modules read their own parameters (SSF's affines, DiffFit's
    scales, RepAdapter's adapters): their parameters in one :class:`ParamPack` (``model.<name>_pack``),
    split once per forward into the views each module reads; under autocast the pack is cast
    once per step before its split, so no module casts its own tensors (``cast_packs``)."""
    pack = pack_parameters(model, [[m] for m in modules], name=f"{name}_pack", label=label)
    batched = BatchedDeltas(packs=[pack])
    batched.cast_packs = True
    attach_batched(model, f"{name}_batched", batched)
    return pack
