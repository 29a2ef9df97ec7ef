"""Weight files keyed by layer: the trainable tensors of a model, one per module and parameter,
under the module's path (``blocks.3.attn.qkv.deltas.q.d``, ``head.weight``), whatever the
execution. A parameter that a batched plan packed (methods/batched) is written under the path of
the module that owns it, so a file does not depend on packing and loads into a model built with
or without it.

The run's ``trainable.safetensors`` and the checkpoint's ``trainable`` entry are written with
:func:`layer_state` and read with :func:`load_layer_state`. Files written before weights were
keyed by layer (main up to 5e0e812: a pack's flat tensors, e.g. ``householder_pack.d``) are
converted on load by the model's own packing: the same configuration, built as main built it (with
the method's batched plan), packs the same way.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from .batched import ParamPack

__all__ = ["layer_state", "load_layer_state"]

# Keys that moved, as (old prefix, new prefix): FacT-TK's shared factors were held by its batched
# module (``fact_tk.factors.u``) before they became the model's own (``fact_tk.u``).
RENAMED: Tuple[Tuple[str, str], ...] = (("fact_tk.factors.", "fact_tk."),)


def _targets(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every trainable tensor by its layer key: a parameter, or its view into a pack."""
    names = {id(m): n for n, m in model.named_modules()}
    rank = {id(m): i for i, m in enumerate(model.modules())}
    keyed = []  # (module position, key, tensor): a file reads in the model's order
    for n, p in model.named_parameters():
        owner_name = n.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        if p.requires_grad and not isinstance(owner, ParamPack):
            keyed.append((rank[id(owner)], n, p))
    for m in model.modules():
        if isinstance(m, ParamPack) and any(p.requires_grad for p in m.parameters()):
            keyed += [(rank[id(member)], f"{names[id(member)]}.{name}", view) for member, name, view in m.layers()]
    return {k: t for _, k, t in sorted(keyed, key=lambda e: e[0])}


def layer_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable tensors by layer key (module docstring), detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in _targets(model).items()}


def _unpacked(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with every pack tensor of an old file (``<pack path>.<stored name>``) split into
    its layers' keys, by the model's packing, and renamed keys (:data:`RENAMED`) moved."""
    state = dict(state)
    for old, new in RENAMED:
        for k in [k for k in state if k.startswith(old)]:
            state[new + k[len(old):]] = state.pop(k)
    names = {id(m): n for n, m in model.named_modules()}
    for path, pack in [(n, m) for n, m in model.named_modules() if isinstance(m, ParamPack)]:
        for store, param in pack.named_parameters(recurse=False):
            key = f"{path}.{store}" if path else store
            if key not in state:
                continue
            if state[key].numel() != param.numel():
                continue  # not this packing: left as an unexpected key
            flat = state.pop(key).reshape(-1)
            for (u, name), (where, off, count, shape) in pack.slots.items():
                if where != store:
                    continue
                size = torch.Size(shape).numel()
                for i, member in enumerate(pack.members[u]):
                    state[f"{names[id(member)]}.{name}"] = flat[off + i * size:off + (i + 1) * size].view(shape)
    return state


def load_layer_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """Copy ``state`` (layer keys, or an old packed file) into the model's trainable tensors.

    Returns ``(unexpected, absent)``: keys the model does not have and trainable tensors the
    state lacks; if either is non-empty nothing is loaded (the caller names the file and the fix).
    A tensor of the wrong shape raises ValueError naming it."""
    state = _unpacked(model, state)
    targets = _targets(model)
    unexpected = [k for k in state if k not in targets]
    absent = [k for k in targets if k not in state]
    if unexpected or absent:
        return unexpected, absent
    bad = [f"{k}: {tuple(state[k].shape)} for {tuple(t.shape)}" for k, t in targets.items()
           if tuple(state[k].shape) != tuple(t.shape)]
    if bad:
        raise ValueError(f"weights of other shapes than the model's ({len(bad)}, e.g. {bad[:3]}); "
                         "was the run built with another method or model config?")
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(state[k])
    return [], []
