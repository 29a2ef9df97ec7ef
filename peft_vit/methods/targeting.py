"""Where a method places its modules: the placement helpers a method's ``inject`` calls.

* :func:`adapt_linears` wraps a frozen ``nn.Linear`` in an :class:`AdaptedLinear` and attaches a
  method-specific :class:`Delta` to the whole matrix or to one block of a fused one (timm's
  ``attn.qkv`` is three 768-row blocks: q, k, v), one :class:`Site` each.
* :func:`insert_after` places a new module after an existing one (adapters, SSF affines).
* :func:`insert_parallel` adds a new module's output to an existing module's output, reading
  that module's input or the input of an earlier module (AdaptFormer-style parallel adapters).
* :func:`replace_module` swaps a parameter-free module (a dropout, a drop-path) for another one
  that names its inference-time replacement via ``merged_replacement()``.

Sites are found relative to the backbone's transformer blocks (:func:`peft_vit.backbone.block_names`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..backbone import block_names
from .wrappers import AdaptedLinear, Delta, InputTap, InsertedAfter, InsertedParallel, PeftModule, set_submodule

__all__ = ["FUSED_BLOCKS", "TARGET_ALIASES", "Site", "adapt_linears", "insert_after", "insert_parallel",
           "replace_module"]

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


@dataclass(frozen=True)
class Site:
    """Where a Delta goes, as :func:`adapt_linears` hands it to ``make_delta``: the module name,
    the block (``"all"``, or ``q``/``k``/``v`` of a fused projection), the layer index (the
    position of its transformer block, :func:`~peft_vit.backbone.layer_index`), and the frozen
    Linear with the block's output rows. ``weight`` and ``bias`` are views of the frozen block
    (e.g. for a DoRA-like method that needs the weight's norms)."""

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
                set_submodule(model, n, wrapped)
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
    set_submodule(model, name, wrapped)
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
            set_submodule(model, input_of, src)
        tap = src
    wrapped = InsertedParallel(model.get_submodule(name), module, tap)
    set_submodule(model, name, wrapped)
    return wrapped


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Swap the parameter-free submodule ``name`` (a dropout, a drop-path, an identity) for
    ``module``, which must hold no parameters either and name the plain module that stands in for
    it at inference via ``merged_replacement()`` (see :func:`~peft_vit.methods.merging.merge`).
    Returns the old module."""
    old = model.get_submodule(name)
    if any(True for _ in old.parameters()) or any(True for _ in module.parameters()):
        raise ValueError(f"replace_module is for parameter-free modules only ({name})")
    if not callable(getattr(module, "merged_replacement", None)):
        raise TypeError(f"{type(module).__name__} must define merged_replacement()")
    set_submodule(model, name, module)
    return old
