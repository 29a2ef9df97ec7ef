"""Resumable training state: trainable weights, optimiser, scheduler, scaler, RNG states and
position (epoch, step). Written atomically; small, since frozen weights are not saved."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from ..record import atomic_file


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


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


def save(path: Path, *, model: nn.Module, optimizer, scheduler, scaler, epoch: int, step: int,
         extra: Optional[Dict[str, Any]] = None) -> None:
    """``epoch``/``step``: where training continues (step-th batch of epoch)."""
    atomic_save({
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "step": step,
        "extra": extra or {},
    }, path)


def load(path: Path, *, model: nn.Module, optimizer, scheduler, scaler) -> Dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = model.load_state_dict(state["trainable"], strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} does not match the model: unexpected {missing.unexpected_keys[:5]}")
    absent = [n for n, p in model.named_parameters() if p.requires_grad and n not in state["trainable"]]
    if absent:
        raise RuntimeError(f"checkpoint {path} lacks trainable parameters {absent[:5]}; was the config changed?")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state
