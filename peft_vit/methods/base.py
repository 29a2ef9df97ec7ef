"""The one shared mechanism every PEFT method uses: a registry, targeting, the trainable set,
merging and counting.

A method is a subclass of :class:`Method`, registered by name with :func:`register_method`.
It touches the ViT only through two helpers:

* :func:`adapt_linears` wraps a frozen ``nn.Linear`` in an :class:`AdaptedLinear` and attaches a
  method-specific :class:`Delta` to the whole matrix or to one block of a fused one (timm's
  ``attn.qkv`` is three 768-row blocks: q, k, v).
* :func:`insert_after` places a new module after an existing one (adapters, SSF affines).
* :func:`insert_parallel` adds a new module's output to an existing module's output, reading
  that module's input or the input of an earlier module (AdaptFormer-style parallel adapters).
* :func:`replace_module` swaps a parameter-free module (a dropout, a drop-path) for another one
  that names its inference-time replacement via ``merged_replacement()``.

For lean training steps a method may also keep its parameters in a :class:`ParamPack` (a few
flat tensors instead of many small ones) and compute its factors for many Linears at once in a
:class:`BatchedDeltas` (see householder.py, kadaptation.py, rlrr.py).

Everything a method adds is a :class:`PeftModule`; after injection exactly those, plus the
classifier head, are trainable (a method may widen that set, e.g. ``full``).

Merging folds every :class:`AdaptedLinear` back into a plain ``nn.Linear`` (``W + ΔW``) and every
inserted module into the module it follows, so a merged model is the backbone's own class with
no extra modules.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "METHODS", "Method", "Delta", "PeftModule", "AdaptedLinear", "InsertedAfter", "InsertedParallel",
    "Site", "register_method", "get_method", "adapt_linears", "insert_after", "insert_parallel",
    "replace_module", "merge", "ParamPack", "pack_parameters", "BatchedDeltas", "attach_batched",
    "count_parameters", "NotMergeableError", "FUSED_BLOCKS", "default_no_weight_decay",
    "block_names", "layer_index", "backbone_family", "UnsupportedBackboneError", "low_rank_output",
]

METHODS: Dict[str, Type["Method"]] = {}

# Names a target may use for the blocks of a fused projection. ``attn.qkv`` of timm's ViT holds
# q, k and v stacked along the output dimension, in that order.
FUSED_BLOCKS: Dict[str, Tuple[str, ...]] = {"qkv": ("q", "k", "v")}

# Short target names -> (module-name suffix, block or None for the whole matrix).
TARGET_ALIASES: Dict[str, Tuple[str, Optional[str]]] = {
    "qkv": ("attn.qkv", None),
    "q": ("attn.qkv", "q"),
    "k": ("attn.qkv", "k"),
    "v": ("attn.qkv", "v"),
    "o": ("attn.proj", None),
    "fc1": ("mlp.fc1", None),
    "fc2": ("mlp.fc2", None),
}


class NotMergeableError(RuntimeError):
    pass


class UnsupportedBackboneError(ValueError):
    """A method cannot apply to a backbone family (e.g. VPT's prompt tokens and Swin's windows)."""


# The transformer blocks of the timm families this project supports, in forward order: ViT and its
# relatives (DINOv2, CLIP, MAE) ``blocks.N``; Swin ``layers.S.blocks.N`` (hierarchical: the width
# grows by stage). A method locates its sites relative to these names (``<block>.attn.qkv``).
BLOCK_NAME = re.compile(r"(?:layers\.\d+\.)?blocks\.\d+")


def backbone_family(model: nn.Module) -> str:
    """``vit`` or ``swin`` (timm's ``VisionTransformer`` / ``SwinTransformer``), else the class name."""
    kind = type(model).__name__
    return {"VisionTransformer": "vit", "SwinTransformer": "swin"}.get(kind, kind)


def block_names(model: nn.Module, pattern: Optional[str] = None) -> List[str]:
    """The names of the model's transformer blocks, in forward order (:data:`BLOCK_NAME`), or those
    matching the fnmatch ``pattern`` (a method's ``blocks`` option) when one is given."""
    if pattern is None:
        names = [n for n, _ in model.named_modules() if BLOCK_NAME.fullmatch(n)]
    else:
        names = [n for n, _ in model.named_modules() if fnmatch.fnmatch(n, pattern) and n.count(".") == pattern.count(".")]
    if not names:
        want = repr(pattern) if pattern else "blocks.N or layers.S.blocks.N"
        raise ValueError(f"{type(model).__name__}: no transformer block matches {want}; pass the blocks' "
                         "module names as a pattern (a method's `blocks` option, e.g. method.blocks='blocks.*')")
    return names


def layer_index(model: nn.Module, pattern: Optional[str] = None) -> Callable[[str], int]:
    """``index(module_name)``: the position of the block holding that module among
    :func:`block_names` (one count across Swin's stages), -1 outside every block."""
    where = {b: i for i, b in enumerate(block_names(model, pattern))}

    def index(name: str) -> int:
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            i = where.get(".".join(parts[:k]))
            if i is not None:
                return i
        return -1
    return index


class PeftModule(nn.Module):
    """Marker base: every parameter of a PeftModule is a method parameter and trains.

    Its parameters may live in a :class:`ParamPack` instead (see :func:`pack_parameters`); they
    then read, under their own names (``delta.v_l``), as views into the pack's flat tensors."""

    def __getattr__(self, name: str):
        packed = self.__dict__.get("_packed")
        if packed is not None and name in packed[1]:
            return packed[0].view_of(packed[1][name])
        return super().__getattr__(name)


class ParamPack(PeftModule):
    """The parameters of many method modules in one flat tensor per parameter name (``v_l``
    holds the ``v_l`` of every packed module), so that a training step updates a few large
    tensors instead of hundreds of small ones (each costs the optimiser a few kernel launches per
    step), and so that the same parameter of many modules is one contiguous (count, *shape) view
    that batched math reads with no stack or copy.

    ``units`` is a list of module lists; the modules of one unit share class, parameter names and
    shapes. A 1-d parameter stays 1-d and any other is stored as (n, 1), so that the optimiser's
    usual rule (no weight decay on 1-d tensors and biases) and AdamW's element-wise update treat
    every value exactly as before packing. With ``label`` all 1-d parameters share one tensor
    named ``label`` and all others one named ``label_matrix`` (name the label after what is packed,
    so that weights saved under another configuration fail to load by name, not by size). With
    ``group(module, name)`` each stored name gets the suffix ``_<group>``, so parameters the
    optimiser must treat apart (e.g. decayed or not) live in separate tensors."""

    def __init__(self, units: Sequence[Sequence[nn.Module]], label: Optional[str] = None,
                 group: Optional[Callable[[nn.Module, str], str]] = None):
        super().__init__()
        self.slots: Dict[Tuple[int, str], Tuple[str, int, int, Tuple[int, ...]]] = {}
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
                m.__dict__["_packed"] = (self, {n: (u, n, i) for n in names})
        for n, ts in parts.items():
            t = torch.cat(ts)
            self.register_parameter(n, nn.Parameter(t if ndim[n] <= 1 else t.unsqueeze(1)))

    def unpack(self) -> Dict[Tuple[int, str], torch.Tensor]:
        """Every slot as a flat (count·numel,) view: one split per stored tensor."""
        out: Dict[Tuple[int, str], torch.Tensor] = {}
        for store, p in self._parameters.items():
            keys = sorted((k for k, v in self.slots.items() if v[0] == store), key=lambda k: self.slots[k][1])
            sizes = [self.slots[k][2] * math.prod(self.slots[k][3]) for k in keys]
            flat = p if p.dim() == 1 else p.view(-1)
            out.update(zip(keys, flat.split(sizes) if len(keys) > 1 else [flat]))
        return out

    def stacked(self, unit: int, name: str) -> torch.Tensor:
        """Parameter ``name`` of every module of ``unit``: a (count, *shape) view."""
        store, off, count, shape = self.slots[(unit, name)]
        return self._parameters[store].view(-1)[off:off + count * math.prod(shape)].view(count, *shape)

    def view_of(self, where: Tuple[int, str, int]) -> torch.Tensor:
        unit, name, i = where
        return self.stacked(unit, name)[i]


def pack_parameters(owner: nn.Module, units: Sequence[Sequence[nn.Module]], name: str = "pack",
                    label: Optional[str] = None,
                    group: Optional[Callable[[nn.Module, str], str]] = None) -> ParamPack:
    """Move the parameters of ``units`` into one :class:`ParamPack`, registered as ``owner.name``."""
    pack = ParamPack(units, label, group)
    owner.add_module(name, pack)
    return pack


def block_onehot(lin: "AdaptedLinear") -> Tuple[torch.Tensor, int]:
    """Where the adapted blocks of a fused Linear sit: a (G, NB) one-hot matrix (row g: the g-th
    adapted block in row order, column: its slot among the NB equal blocks) and the block size.
    Batched deltas scatter their G block updates into the whole output with it, without slicing."""
    keys = sorted(lin.deltas, key=lambda k: lin.slices[k][0])
    size = lin.slices[keys[0]][1] - lin.slices[keys[0]][0]
    onehot = torch.zeros(len(keys), lin.out_features // size, device=lin.base.weight.device)
    for g, k in enumerate(keys):
        onehot[g, lin.slices[k][0] // size] = 1.0
    return onehot, size


class BatchedDeltas(nn.Module):
    """Computes the parameter-side factors of many :class:`AdaptedLinear` s together (across
    blocks of a fused projection and across layers), once per forward of the model, in a handful
    of batched ops instead of a small graph per matrix.

    Attached with :func:`attach_batched`: a forward pre-hook of the model calls :meth:`compute`
    and keeps its result for that forward; each adapted Linear then calls
    :meth:`forward_linear` with its index. A Linear called on its own (outside the model's
    forward) finds no factors and runs its deltas one by one: the same math."""

    def __init__(self, linears: Sequence["AdaptedLinear"]):
        super().__init__()
        self._cache: Optional[List] = None
        for i, lin in enumerate(linears):
            lin.__dict__["_batched"] = (self, i)

    def compute(self) -> List:
        raise NotImplementedError

    def forward_linear(self, lin: "AdaptedLinear", index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def low_rank_output(lin: "AdaptedLinear", x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                    input_dropout: Optional[nn.Module] = None, inner_dropout: Optional[nn.Module] = None
                    ) -> torch.Tensor:
    """``lin.base(x) + inner_dropout(input_dropout(x) @ left) @ right``, one ``addmm`` over the
    flattened tokens: a Linear whose batched update is a product of two factors (fact_tk, vera)."""
    if x.dtype != left.dtype:
        left, right = left.to(x.dtype), right.to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    h = (x2 if input_dropout is None else input_dropout(x2)) @ left
    y = torch.addmm(lin.base(x2), h if inner_dropout is None else inner_dropout(h), right)
    return y.view(*x.shape[:-1], y.shape[-1])


def _refresh_batched(model: nn.Module, args) -> None:
    for m in model.children():
        if isinstance(m, BatchedDeltas):
            m._cache = m.compute()


def _clear_batched(model: nn.Module, args, output) -> None:
    for m in model.children():
        if isinstance(m, BatchedDeltas):
            m._cache = None


def attach_batched(model: nn.Module, name: str, batched: BatchedDeltas) -> BatchedDeltas:
    model.add_module(name, batched)
    if _refresh_batched not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_refresh_batched)
        model.register_forward_hook(_clear_batched, always_call=True)
    return batched


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


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one :class:`Delta` per adapted block.

    ``blocks`` maps a block name to its output rows ``(start, stop)``; the whole matrix is the
    block ``"all"``. With ``weight_space=True`` the forward builds ``W + ΔW`` and runs one
    matmul (cheaper for methods whose ΔW depends on W, such as RLRR); otherwise it adds the
    deltas' outputs to the frozen output (a block's with ``index_add`` on its rows), which needs
    no weight gradient at all. A method may serve it from a :class:`BatchedDeltas` instead: all
    its blocks in one update, with factors computed for many Linears at once.
    """

    def __init__(self, base: nn.Linear, weight_space: bool = False):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.deltas = nn.ModuleDict()
        self.slices: Dict[str, Tuple[int, int]] = {}
        self.weight_space = weight_space

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
        batched = self.__dict__.get("_batched")
        if batched is not None and batched[0]._cache is not None:
            return batched[0].forward_linear(self, batched[1], x)
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


class InsertedAfter(nn.Module):
    """``inserted(original(x))``: the result of :func:`insert_after`.

    An inserted module may define ``forward_after(original, x)`` to compute the composition
    itself, e.g. an affine folded into the LayerNorm it follows, on the fly (no extra activation).
    """

    def __init__(self, original: nn.Module, inserted: PeftModule):
        super().__init__()
        self.original = original
        self.inserted = inserted

    def forward(self, x):
        fused = getattr(self.inserted, "forward_after", None)
        if fused is not None:
            return fused(self.original, x)
        return self.inserted(self.original(x))

    def merge(self) -> nn.Module:
        fold = getattr(self.inserted, "fold_into", None)
        if fold is None:
            raise NotMergeableError(
                f"{type(self.inserted).__name__} is a sequential module with a non-linearity and "
                "cannot be folded into the backbone's weights; keep the unmerged model")
        return fold(self.original)


class InputTap(nn.Module):
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


class InsertedParallel(nn.Module):
    """``original(x) + inserted(s)``: the result of :func:`insert_parallel`. ``s`` is ``x`` itself,
    or the input an :class:`InputTap` recorded earlier in the same forward."""

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


# --------------------------------------------------------------------------- registry

class Method:
    """Base class of a PEFT method. A subclass sets ``name`` (via :func:`register_method`),
    takes its config keys as constructor arguments and implements :meth:`inject`."""

    name: str = ""
    mergeable: bool = True

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


# --------------------------------------------------------------------------- targeting

def _resolve_target(target: str) -> Tuple[str, Optional[str]]:
    """'q' -> ('attn.qkv', 'q'); 'attn.proj' -> ('attn.proj', None); 'mlp.fc1' stays."""
    return TARGET_ALIASES.get(target, (target, None))


def _block_rows(linear: nn.Linear, module_name: str, block: Optional[str]) -> Tuple[str, Tuple[int, int]]:
    if block is None:
        return "all", (0, linear.out_features)
    fused = FUSED_BLOCKS.get(module_name.rsplit(".", 1)[-1])
    if fused is None or block not in fused:
        raise ValueError(f"{module_name} has no block {block!r}")
    n = len(fused)
    if linear.out_features % n:
        raise ValueError(f"{module_name}: {linear.out_features} rows do not split into {n} blocks")
    size = linear.out_features // n
    i = fused.index(block)
    return block, (i * size, (i + 1) * size)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


@dataclass(frozen=True)
class Site:
    """Where a Delta goes, as :func:`adapt_linears` hands it to ``make_delta``: the module name,
    the block (``"all"``, or ``q``/``k``/``v`` of a fused projection), the layer index (the
    position of its transformer block, :func:`layer_index`), and the frozen Linear with the block's output rows. ``weight`` and ``bias``
    are views of the frozen block (e.g. for a DoRA-like method that needs the weight's norms)."""

    name: str
    block: str
    layer: int
    linear: nn.Linear
    rows: Tuple[int, int]

    @property
    def out_features(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.rows[0]:self.rows[1]]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        b = self.linear.bias
        return None if b is None else b[self.rows[0]:self.rows[1]]


def adapt_linears(
    model: nn.Module,
    targets: Sequence[str],
    make_delta: Callable[["Site"], Delta],
    blocks: Optional[str] = None,
    weight_space: bool = False,
) -> List[str]:
    """Attach a Delta to every Linear named by ``targets`` inside every transformer block
    (:func:`block_names`; ``blocks``: an fnmatch pattern for other block names).

    ``targets`` are short names (``q k v qkv o fc1 fc2``) or module-name suffixes
    (``attn.proj``). ``make_delta(site)`` builds one Delta for one :class:`Site`. Returns the
    adapted ``module_name[:block]`` list, in order.
    """
    done: List[str] = []
    names = dict(model.named_modules())
    block_list = block_names(model, blocks)
    for target in targets:
        suffix, block = _resolve_target(target)
        matched = [f"{b}.{suffix}" for b in block_list if f"{b}.{suffix}" in names]
        if not matched:
            raise ValueError(f"target {target!r} matches no module {suffix!r} in the blocks "
                             f"({block_list[0]}, …) of {type(model).__name__}")
        for i, n in enumerate(matched):
            mod = model.get_submodule(n)
            if isinstance(mod, nn.Linear):
                wrapped = AdaptedLinear(mod, weight_space=weight_space)
                _set_submodule(model, n, wrapped)
            elif isinstance(mod, AdaptedLinear):
                wrapped = mod
            else:
                raise TypeError(f"target {n} is a {type(mod).__name__}, not a Linear")
            bname, rows = _block_rows(wrapped.base, n, block)
            layer = block_list.index(n[:-len(suffix) - 1])
            wrapped.add(bname, rows, make_delta(Site(n, bname, layer, wrapped.base, rows)))
            done.append(n if bname == "all" else f"{n}:{bname}")
    return done


def insert_after(model: nn.Module, name: str, module: PeftModule) -> InsertedAfter:
    """Replace submodule ``name`` by ``module(original(x))``."""
    original = model.get_submodule(name)
    wrapped = InsertedAfter(original, module)
    _set_submodule(model, name, wrapped)
    return wrapped


def insert_parallel(model: nn.Module, name: str, module: PeftModule,
                    input_of: Optional[str] = None) -> InsertedParallel:
    """Replace submodule ``name`` by ``original(x) + module(s)``.

    ``s`` is the input of ``name`` itself, or with ``input_of`` the input of another submodule
    that runs earlier in the same forward (e.g. the pre-LayerNorm stream of a block: the input of
    ``blocks.i.norm2``, added at the output of ``blocks.i.drop_path2``).
    """
    tap = None
    if input_of is not None:
        src = model.get_submodule(input_of)
        if not isinstance(src, InputTap):
            src = InputTap(src)
            _set_submodule(model, input_of, src)
        tap = src
    wrapped = InsertedParallel(model.get_submodule(name), module, tap)
    _set_submodule(model, name, wrapped)
    return wrapped


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Swap the parameter-free submodule ``name`` (a dropout, a drop-path, an identity) for
    ``module``, which must hold no parameters either and name the plain module that stands in for
    it at inference via ``merged_replacement()`` (see :func:`merge`). Returns the old module."""
    old = model.get_submodule(name)
    if any(True for _ in old.parameters()) or any(True for _ in module.parameters()):
        raise ValueError(f"replace_module is for parameter-free modules only ({name})")
    if not callable(getattr(module, "merged_replacement", None)):
        raise TypeError(f"{type(module).__name__} must define merged_replacement()")
    _set_submodule(model, name, module)
    return old


# --------------------------------------------------------------------------- merge / counts

@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every method module into plain weights, in place; returns the model.

    The result has the backbone's class and no extra modules. Raises NotMergeableError for
    methods that cannot be folded (sequential adapters with a non-linearity).
    """
    _check_mergeable(model)
    todo = [(n, m) for n, m in model.named_modules()
            if isinstance(m, (AdaptedLinear, InsertedAfter, InsertedParallel, InputTap))]
    # Outermost first would re-visit children; merge deepest first so inner wrappers are folded
    # before an outer one reads them.
    for n, m in sorted(todo, key=lambda t: -t[0].count(".")):
        _set_submodule(model, n, m.merge())
    # parameter packs and batched factors served the folded modules only
    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, (ParamPack, BatchedDeltas))]:
        parent_name, _, attr = n.rpartition(".")
        delattr(model.get_submodule(parent_name) if parent_name else model, attr)
    for hooks, fn in ((model._forward_pre_hooks, _refresh_batched), (model._forward_hooks, _clear_batched)):
        for k in [k for k, v in hooks.items() if v is fn]:
            del hooks[k]
            model._forward_hooks_always_called.pop(k, None)
    # Modules a method swapped in without parameters (e.g. RLRR's residual dropout) name the
    # plain module that replaces them at inference via ``merged_replacement()``.
    for n, m in list(model.named_modules()):
        plain = getattr(m, "merged_replacement", None)
        if callable(plain) and n:
            _set_submodule(model, n, plain())
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
    bad = [n for n, m in model.named_modules()
           if isinstance(m, InsertedParallel)
           or (isinstance(m, InsertedAfter) and not callable(getattr(m.inserted, "fold_into", None)))]
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
