"""The optimisation recipe: AdamW (or VPT's SGD) over the trainable parameters with the method's
no-decay set, and the schedule (linear warm-up, cosine, optional restarts and cool-down; timm),
stepped per iteration or per epoch (``optim.lr_step``).
The loop builds both here and only steps them."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigValueError

# (key, the test a value must pass, what it must be): checked before anything is built, so a bad
# value is named by its key rather than by the library that would trip on it later
VALUE_RULES = (
    ("trainer.epochs", lambda v: isinstance(v, int) and v >= 1, "a whole number of epochs >= 1"),
    ("trainer.batch_size", lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    ("trainer.eval_batch_size", lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
    ("trainer.eval_every", lambda v: isinstance(v, int) and v >= 0, "a whole number of epochs >= 0 (0: last only)"),
    ("trainer.checkpoint_every", lambda v: v is None or isinstance(v, int) and v >= 0,
     "a whole number of epochs >= 0, or null (0 or null: none)"),
    ("trainer.checkpoint_every_s", lambda v: v is None or v > 0,
     "a number of seconds > 0, or null (no checkpoints by time)"),
    ("trainer.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("trainer.grad_clip", lambda v: v is None or v > 0, "a norm > 0, or null for none"),
    ("optim.lr", lambda v: v > 0, "a learning rate > 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_lr", lambda v: v >= 0, ">= 0"),
    ("optim.min_lr", lambda v: v >= 0, ">= 0"),
    ("optim.cooldown_epochs", lambda v: isinstance(v, int) and v >= 0, "a whole number of epochs >= 0"),
    ("model.drop_path_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
)


def check_values(cfg) -> None:
    """Raise :class:`ConfigValueError` naming the first key of :data:`VALUE_RULES` whose value
    cannot work (``optim.lr=-0.001: must be a learning rate > 0``)."""
    from omegaconf import OmegaConf

    for key, ok, must in VALUE_RULES:
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue
        try:
            good = ok(value) and not isinstance(value, bool)
        except TypeError:
            good = False
        if not good:
            raise ConfigValueError(f"{key}={value!r}: must be {must}")


def build_optimizer(model: nn.Module, ocfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over trainable parameters in two groups, not decayed and decayed by ``weight_decay``.
    The model's method names the first (``Method.no_weight_decay``: by default timm's rule, no
    decay on biases, norms and other 1-d tensors; RLRR follows its official code's groups)."""
    from ..methods.base import default_no_weight_decay

    method = getattr(model, "peft_method", None)
    skip = method.no_weight_decay(model) if method is not None else default_no_weight_decay(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in skip], "weight_decay": 0.0},
              {"params": [p for n, p in params if n not in skip], "weight_decay": ocfg.weight_decay}]
    if ocfg.name == "sgd":  # VPT's optimiser (configs/optim/sgd_cosine.yaml)
        return torch.optim.SGD(groups, lr=ocfg.lr, momentum=ocfg.momentum, fused=device.type == "cuda")
    if ocfg.name != "adamw":
        raise ConfigValueError(f"optim.name={ocfg.name!r}: choose adamw (configs/optim/adamw_cosine.yaml) or sgd "
                         f"(configs/optim/sgd_cosine.yaml)")
    return torch.optim.AdamW(groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps,
                             fused=device.type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg, epochs: int, steps_per_epoch: int):
    """Per-iteration linear warm-up from ``warmup_lr``, cosine to ``min_lr``, then (RLRR's
    cool-down) ``cooldown_epochs`` epochs held at ``min_lr``. With ``restart_epochs`` the cosine
    restarts from ``lr`` every that many epochs (SGDR, as RLRR's code for CUB and Dogs). Call
    ``step_update(n)`` after the n-th optimiser step. ``lr_step: epoch`` (FacT's, SSF's and VPT's
    code: timm's or their scheduler stepped once per epoch) holds each epoch's lr for all its steps;
    absent or ``iteration``: a new lr every step."""
    from timm.scheduler import CosineLRScheduler

    class PerEpoch(CosineLRScheduler):
        def step_update(self, num_updates: int, metric=None):  # the lr of the epoch the next step is in
            return super().step_update(num_updates // steps_per_epoch * steps_per_epoch, metric)

    lr_step = ocfg.get("lr_step", "iteration")
    if lr_step not in ("iteration", "epoch"):
        raise ConfigValueError(f"optim.lr_step={lr_step!r}: choose iteration or epoch")

    cosine_epochs = epochs - ocfg.get("cooldown_epochs", 0)
    if cosine_epochs <= 0:
        raise ConfigValueError(f"trainer.epochs={epochs} minus optim.cooldown_epochs={ocfg.get('cooldown_epochs', 0)} "
                               f"leaves no epochs to train; raise trainer.epochs or lower optim.cooldown_epochs")
    cycle, cycles = cosine_epochs, 1
    if ocfg.get("restart_epochs") is not None:  # 0 is an error, not "no restarts"
        cycle = ocfg.restart_epochs
        if not 0 < cycle <= cosine_epochs:
            raise ConfigValueError(f"optim.restart_epochs={cycle} must be in (0, {cosine_epochs}] (trainer.epochs "
                             f"minus optim.cooldown_epochs), or null for one cosine")
        cycles = math.ceil(cosine_epochs / cycle)
    return (PerEpoch if lr_step == "epoch" else CosineLRScheduler)(
        optimizer, t_initial=int(cycle * steps_per_epoch), lr_min=ocfg.min_lr, cycle_limit=cycles,
        warmup_t=int(ocfg.warmup_epochs * steps_per_epoch), warmup_lr_init=ocfg.warmup_lr, t_in_epochs=False)
