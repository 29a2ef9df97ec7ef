"""Resumable training state: trainable weights, optimiser, scheduler, scaler, RNG states and
position (epoch, step). Written atomically; small, since frozen weights are not saved."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import PeftVitError
from ..record import atomic_file


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable tensors keyed by layer (:func:`peft_vit.methods.weights.layer_state`): the
    checkpoint's ``trainable`` entry and the run's ``trainable.safetensors``."""
    from ..methods.weights import layer_state

    return layer_state(model)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


class CheckpointUnreadable(PeftVitError, RuntimeError):
    """The checkpoint file cannot be read (truncated, garbage, not a peft-vit checkpoint)."""


def save(path: Path, *, model: nn.Module, optimizer, scheduler, scaler, epoch: int, step: int,
         extra: Optional[Dict[str, Any]] = None, config: Optional[Dict[str, Any]] = None) -> None:
    """``epoch``/``step``: where training continues (step-th batch of epoch). ``config``: the
    run's result config (peft_vit.fingerprint.result_config), checked on resume."""
    atomic_save({
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "step": step,
        "extra": extra or {},
        "config": config,
    }, path)


KEYS = ("trainable", "optimizer", "scheduler", "scaler", "rng", "epoch", "step")


def read(path: Path) -> Dict[str, Any]:
    """The checkpoint's contents; :class:`CheckpointUnreadable` naming the file if it cannot be
    read or is not a peft-vit checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - pickle, zip and EOF errors alike: the file is damaged
        raise CheckpointUnreadable(f"checkpoint {path} is unreadable ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict) or any(k not in state for k in KEYS):
        raise CheckpointUnreadable(f"checkpoint {path} is not a peft-vit checkpoint (lacks "
                                   f"{[k for k in KEYS if not isinstance(state, dict) or k not in state]})")
    return state


def restore(path: Path, state: Dict[str, Any], *, model: nn.Module, optimizer, scheduler, scaler) -> None:
    """Load ``state`` (from :func:`read`) into the model, optimiser, scheduler, scaler and RNGs."""
    from ..methods.weights import load_layer_state

    saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    if saved != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointUnreadable(
            f"checkpoint {path}: its optimiser state holds {sum(saved)} tensors, this model trains "
            f"{sum(len(g['params']) for g in optimizer.param_groups)}: it was saved under another packing of the "
            "method's parameters (e.g. before the method got a batched plan, methods/batched/); start the run "
            "over with trainer.resume=never, or delete the file")
    unexpected, absent = load_layer_state(model, state["trainable"])  # by layer; older packed files converted
    if unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: unexpected {unexpected[:5]}")
    if absent:
        raise RuntimeError(f"checkpoint {path} lacks trainable parameters {absent[:5]}; was the config changed?")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def load(path: Path, *, model: nn.Module, optimizer, scheduler, scaler) -> Dict[str, Any]:
    state = read(path)
    restore(path, state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    return state


RESUME_MODES = ("auto", "never", "require")
CHOICES = ("trainer.resume=auto moves an unreadable checkpoint aside and starts over; trainer.resume=never starts "
           "over (the checkpoint is overwritten at the next save); or delete the file")


def resume_state(path: Path, mode: str, config: Dict[str, Any], is_main: bool = True) -> Optional[Dict[str, Any]]:
    """The checkpoint to resume from under ``trainer.resume``, or None to start over.

    * ``auto``: resume from ``path`` if it exists; an unreadable one is moved aside
      (``<name>.unreadable-<time>``) with a warning and the run starts over.
    * ``require``: ``path`` must exist and be readable.
    * ``never``: start over.

    In every mode a readable checkpoint of another configuration (``config``, the run's result
    config) is an error naming the keys that differ; it is never resumed silently."""
    import sys
    import time

    from .rundir import check_same_config

    if mode not in RESUME_MODES:
        raise ValueError(f"trainer.resume={mode!r}; choose one of {', '.join(RESUME_MODES)}")
    path = Path(path)
    if mode == "never":
        if path.exists() and is_main:
            print(f"[peft-vit] trainer.resume=never: not resuming from {path}; starting over", file=sys.stderr)
        return None
    if not path.exists():
        if mode == "require":
            raise FileNotFoundError(f"trainer.resume=require but there is no checkpoint {path}; use trainer.resume=auto "
                                    f"(resume if there is one) or check the output dir")
        return None
    try:
        state = read(path)
    except CheckpointUnreadable as e:
        if mode == "require":
            raise CheckpointUnreadable(f"{e}. Choices: {CHOICES}.") from e.__cause__
        if is_main:
            aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                path.replace(aside)
            except FileNotFoundError:
                pass
            print(f"[peft-vit] WARNING: {e}; moved it to {aside} and starting over (trainer.resume=auto)",
                  file=sys.stderr)
        return None
    check_same_config("checkpoint", path, state.get("config"), config,
                      "Resume it with the configuration that made it, start over with trainer.resume=never "
                      "(it is overwritten), or use another output dir.")
    return state
