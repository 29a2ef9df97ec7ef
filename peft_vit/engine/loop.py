"""The training loop, top to bottom: config -> model -> data -> train/eval -> results.json.

Protocols (named in every output):
  tune   fit train800,       report val200 (``val_acc``)
  final  fit train800val200, report test   (``test_acc``)
The reported accuracy is the last epoch's. ``best_acc_over_epochs`` (the maximum over evaluated
epochs, what most papers report) is recorded too, labelled with the split it selects on.

Resumable: a checkpoint is saved every ``trainer.checkpoint_every`` epochs and when the process
is told to stop (SIGTERM, SIGINT, or submitit's SIGUSR2; at the next step boundary or after the
evaluation in progress; DataLoader workers ignore these signals, see ``signals.py``); a
re-launch with the same output dir continues from it (``trainer.resume``) and ends bit-identical
on CPU. Batches and augmentations are functions of (seed, epoch, position), so a resumed run and
a DDP run see the same images as a plain run. A run owns its output dir while it runs (a lock),
and checkpoints and records of another configuration are refused (``rundir.py``).
"""
from __future__ import annotations

import logging
import math
import resource
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from .. import build_model, count_parameters
from ..data import build_datasets
from ..data.loader import EvalBatches, TrainBatches
from ..record import RESULTS, WEIGHTS, RunContext, RunLogger, RunRecord, atomic_file, git_commit, versions
from . import checkpoint, distributed, rundir
from .signals import StopSignal, ignore_stop_signals_in_worker

log = logging.getLogger("peft_vit")
CHECKPOINT = "checkpoint.pt"


def _precision(pref: str, device: torch.device) -> Optional[torch.dtype]:
    if pref == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[pref]


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
        raise ValueError(f"optim.name={ocfg.name!r}: choose adamw (configs/optim/adamw_cosine.yaml) or sgd "
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
    import math

    from timm.scheduler import CosineLRScheduler

    class PerEpoch(CosineLRScheduler):
        def step_update(self, num_updates: int, metric=None):  # the lr of the epoch the next step is in
            return super().step_update(num_updates // steps_per_epoch * steps_per_epoch, metric)

    lr_step = ocfg.get("lr_step", "iteration")
    if lr_step not in ("iteration", "epoch"):
        raise ValueError(f"optim.lr_step={lr_step!r}: choose iteration or epoch")

    cosine_epochs = epochs - ocfg.get("cooldown_epochs", 0)
    if cosine_epochs <= 0:
        raise ValueError(f"optim.cooldown_epochs={ocfg.cooldown_epochs} leaves no epochs of trainer.epochs={epochs}")
    cycle, cycles = cosine_epochs, 1
    if ocfg.get("restart_epochs") is not None:  # 0 is an error, not "no restarts"
        cycle = ocfg.restart_epochs
        if not 0 < cycle <= cosine_epochs:
            raise ValueError(f"optim.restart_epochs={cycle} must be in (0, {cosine_epochs}] (trainer.epochs "
                             f"minus optim.cooldown_epochs), or null for one cosine")
        cycles = math.ceil(cosine_epochs / cycle)
    return (PerEpoch if lr_step == "epoch" else CosineLRScheduler)(
        optimizer, t_initial=int(cycle * steps_per_epoch), lr_min=ocfg.min_lr, cycle_limit=cycles,
        warmup_t=int(ocfg.warmup_epochs * steps_per_epoch), warmup_lr_init=ocfg.warmup_lr, t_in_epochs=False)


@torch.no_grad()
def evaluate(model: nn.Module, batches: EvalBatches, d: distributed.Dist, amp: Optional[torch.dtype]) -> float:
    model.eval()
    t0 = time.time()
    correct = torch.zeros(2, dtype=torch.float64, device=d.device)
    for x, y in batches:  # already on the device
        with torch.autocast(d.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = model(x).argmax(-1)
        correct[0] += (pred == y).sum()
        correct[1] += y.numel()
    distributed.all_reduce_sum(correct, d)
    acc = 100.0 * (correct[0] / correct[1]).item()
    batches.timed(int(correct[1].item()), time.time() - t0)
    return acc


def compile_enabled(value, device: torch.device) -> bool:
    """``trainer.compile``: ``auto`` compiles on CUDA only (on CPU it is not measured to help),
    ``true`` / ``false`` force it on or off."""
    if value == "auto":
        return device.type == "cuda"
    if isinstance(value, bool):
        return value
    raise ValueError(f"trainer.compile={value!r}: choose auto (torch.compile on CUDA only), true or false")


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process, by its own metric (tracing, AOT
    autograd and code generation of forward and backward graphs, recompiles included)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def run(cfg: DictConfig, context: Optional[RunContext] = None) -> RunRecord:
    """Train and evaluate one run into its output dir, which it owns while it runs (a lock;
    rank 0 holds it under torchrun). With ``skip_done`` a results.json of the same configuration
    is returned as is; one of another configuration is an error naming the keys that differ.
    ``context`` (``train.py`` takes it from Hydra) defaults to ``cfg.output_dir``, nothing else known."""
    t_start = time.time()
    context = context or RunContext(Path(cfg.get("output_dir") or "."))
    out_dir = Path(context.output_dir)
    result_path = out_dir / RESULTS
    result_cfg = rundir.result_config(cfg)
    lock = rundir.RunLock(out_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()
        if lock.previous:
            print(f"[peft-vit] took over the lock of {out_dir} from {lock.previous}, no longer running")
        for p in rundir.remove_stale_temp_files(out_dir):
            print(f"[peft-vit] removed {p}, a write that a killed run left unfinished")
    try:
        done = rundir.skip_done(cfg, out_dir, result_cfg)  # as the sweep launchers decide it
        if done is not None:
            if lock is not None:
                (out_dir / CHECKPOINT).unlink(missing_ok=True)  # a run killed right after its record
            log.info("skip_done: %s exists, nothing to do", result_path)
            print(f"[peft-vit] skip: {result_path} already exists (skip_done=true)")
            return RunRecord.from_dict(done, source=result_path)
        return _train(cfg, t_start, context, result_cfg)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, t_start: float, context: RunContext, result_cfg) -> RunRecord:
    out_dir = Path(context.output_dir)
    result_path = out_dir / RESULTS
    tcfg, ocfg = cfg.trainer, cfg.optim
    d = distributed.init(tcfg.device)
    torch.manual_seed(cfg.seed)
    amp = _precision(tcfg.precision, d.device)

    # ---- model
    model = build_model(cfg).to(d.device)
    method = getattr(model, "peft_method", None)
    counts = count_parameters(model)

    # ---- data
    data = build_datasets(cfg)
    # decoded (in-memory) sets: on the device, no workers; others: DataLoader workers. Batches are
    # functions of (seed, epoch, position) either way (peft_vit.data.loader)
    workers = dict(num_workers=tcfg.num_workers, worker_init_fn=ignore_stop_signals_in_worker)  # main handles signals
    train_batches = TrainBatches(data.train, tcfg.batch_size, cfg.seed, d.device, d.rank, d.world_size,
                                 tcfg.drop_last, **workers)
    eval_batches = EvalBatches(data.eval, tcfg.eval_batch_size, d.device, d.rank, d.world_size, **workers)
    startup_s = time.time() - t_start  # model built, data ready

    # ---- optimisation: per-iteration linear warm-up then cosine (timm)
    optimizer = build_optimizer(model, ocfg, d.device)
    steps_per_epoch = len(train_batches)
    scheduler = build_scheduler(optimizer, ocfg, tcfg.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing, reduction="sum")
    trainable = [p for p in model.parameters() if p.requires_grad]
    net = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    # torch.compile the module that trains; ``model`` stays eager for state dicts, merge and report
    compiled = compile_enabled(tcfg.get("compile", "auto"), d.device)
    compile_s0 = compile_seconds()
    if compiled:
        net = torch.compile(net)

    # ---- resume
    ckpt_path = out_dir / CHECKPOINT
    start_epoch, start_step, history, train_time, images_seen = 0, 0, [], 0.0, 0
    state = checkpoint.resume_state(ckpt_path, tcfg.resume, result_cfg, d.is_main)
    if state is not None:
        checkpoint.restore(ckpt_path, state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_epoch, start_step = state["epoch"], state["step"]
        history, train_time, images_seen = (state["extra"].get(k) for k in ("history", "train_time", "images_seen"))
        if d.is_main:
            print(f"[peft-vit] resumed from {ckpt_path} at epoch {start_epoch}, step {start_step}")

    def save_checkpoint(epoch: int, step: int) -> None:
        if d.is_main:
            checkpoint.save(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            epoch=epoch, step=step,
                            extra=dict(history=history, train_time=train_time, images_seen=images_seen),
                            config=result_cfg)
        distributed.barrier(d)

    # ---- logging (rank 0 only)
    run_cfg = OmegaConf.to_container(cfg, resolve=True)
    eval_key = "val_acc" if cfg.protocol == "tune" else "test_acc"
    label = f"{cfg.protocol}: fit {data.train_split}, eval {data.eval_split}"
    logger = RunLogger(cfg.logger, run_cfg, out_dir, name=f"{cfg.method.name}/{cfg.dataset.task}/s{cfg.seed}",
                       group=context.sweep, tags=[cfg.method.name, cfg.dataset.task, cfg.protocol]) \
        if d.is_main else RunLogger({"name": "none"}, {}, out_dir, "", None, [])
    logger.summary({**counts, "protocol": cfg.protocol})
    if d.is_main:
        print(f"[peft-vit] {cfg.method.name} on {cfg.dataset.name}/{cfg.dataset.task} | protocol {label} | "
              f"trainable {counts['trainable_params']:,} ({counts['trainable_params_no_head']:,} without head) "
              f"of {counts['total_params']:,} | {d.world_size} process(es) on {d.device}")

    # ---- train
    stop = StopSignal()
    from tqdm.auto import tqdm

    # a terminal redraws one line; a log file (SLURM) gets a progress line at most every
    # trainer.log_every_s (tqdm's monitor thread forces one every maxinterval: set it too)
    tty = sys.stderr.isatty()
    every = 0.2 if tty else float(tcfg.log_every_s)
    bar = tqdm(total=tcfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch + start_step,
               disable=not (tcfg.progress and d.is_main), dynamic_ncols=True, desc=cfg.method.name,
               mininterval=every, maxinterval=max(every, 10.0))
    say = bar.write if tty else print  # one line per evaluation (tqdm.write redraws the bar after it)
    try:
        for epoch in range(start_epoch, tcfg.epochs):
            net.train()
            first = start_step if epoch == start_epoch else 0
            t0 = time.time()
            for step, (x, y) in enumerate(train_batches.epoch(epoch, first), start=first):  # on the device
                global_n = min(tcfg.batch_size, len(data.train) - step * tcfg.batch_size)
                with torch.autocast(d.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    # sum over the local share / global batch, times world (DDP averages grads):
                    # the gradient of the global batch mean, whatever the process count
                    loss = criterion(net(x), y) * (d.world_size / global_n)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tcfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                gstep = epoch * steps_per_epoch + step + 1
                scheduler.step_update(gstep)
                images_seen += global_n
                bar.update(1)
                # the loss is read back (a device sync) every 10 steps, at an epoch's end and before a
                # checkpoint, not every step: a non-finite loss stops the run within 10 steps
                if gstep % 10 == 0 or step + 1 == steps_per_epoch or stop.signum is not None:
                    loss_value = loss.item() / d.world_size
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"loss is {loss_value} at epoch {epoch}, step {step}; lower optim.lr")
                    lr_now = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", lr=f"{lr_now:.2e}",
                                    refresh=False)  # shown with the next (rate-limited) update
                    if gstep % 10 == 0:
                        logger.log({"train/loss": loss_value, "train/lr": lr_now, "epoch": epoch}, step=gstep)
                if stop.signum is not None:
                    train_time += time.time() - t0
                    save_checkpoint(epoch, step + 1)
                    print(f"[peft-vit] signal {stop.signum}: checkpoint saved at epoch {epoch}, step {step + 1}")
                    stop.forward()
                    t0 = time.time()
            train_time += time.time() - t0
            last = epoch + 1 == tcfg.epochs
            if last or (tcfg.eval_every and (epoch + 1) % tcfg.eval_every == 0):
                # evaluation draws nothing from the training RNG (dropout, drop-path), whatever its
                # loader does (a DataLoader without a generator seeds its workers from the global RNG,
                # once per epoch or, with persistent workers, once per process: a resumed run would differ)
                with torch.random.fork_rng(devices=[]):
                    acc = evaluate(net, eval_batches, d, amp)
                history.append({"epoch": epoch + 1, "acc": acc})
                logger.log({f"eval/{eval_key}": acc, "epoch": epoch + 1}, step=(epoch + 1) * steps_per_epoch)
                say(f"[peft-vit] epoch {epoch + 1}: {data.eval_split} acc {acc:.2f}%  [{cfg.protocol}]")
            # a signal during the evaluation is handled after it (after the last one, the run just finishes)
            stopping = stop.signum is not None and not last
            if stopping or (not last and tcfg.checkpoint_every and (epoch + 1) % tcfg.checkpoint_every == 0):
                save_checkpoint(epoch + 1, 0)
            if stopping:
                print(f"[peft-vit] signal {stop.signum}: checkpoint saved at epoch {epoch + 1}, step 0")
                stop.forward()
    finally:
        bar.close()
        stop.restore()

    # ---- record
    best = max(history, key=lambda h: h["acc"])
    peak_mb = (torch.cuda.max_memory_allocated(d.device) / 2**20 if d.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    record = RunRecord(
        method=cfg.method.name, dataset=cfg.dataset.name, task=cfg.dataset.task, protocol=cfg.protocol,
        seed=cfg.seed, train_split=data.train_split, eval_split=data.eval_split,
        **{eval_key: history[-1]["acc"]},
        accuracy_is=f"last epoch ({history[-1]['epoch']}), {data.eval_split} split",
        best_acc_over_epochs=best["acc"], best_epoch=best["epoch"], best_acc_selects_on=data.eval_split,
        epochs=tcfg.epochs, history=history, **counts,
        wall_time_s=round(time.time() - t_start, 2),
        train_images_per_s=round(images_seen / max(train_time, 1e-9), 2),
        startup_s=round(startup_s, 2), eval_images_per_s=eval_batches.images_per_s,
        peak_memory_mb=round(peak_mb, 1),
        peak_memory_kind="cuda_max_allocated" if d.device.type == "cuda" else "cpu_max_rss",
        world_size=d.world_size, device=str(d.device),
        compiled=compiled, compile_time_s=round(compile_seconds() - compile_s0, 2),
        experiment=context.experiment, sweep=context.sweep, overrides=list(context.overrides),
        git_commit=git_commit(), versions=versions(),
        config=run_cfg, config_fingerprint=rundir.fingerprint(result_cfg),
        diagnostics=method.report(model) if method is not None and d.is_main else {},
    )
    if d.is_main:
        if tcfg.save_weights:  # the trained parameters, for scripts/export_merged.py
            from safetensors.torch import save as safetensors_bytes

            with atomic_file(out_dir / WEIGHTS, "wb") as f:
                f.write(safetensors_bytes(checkpoint.trainable_state(model)))
        record.write(result_path)  # before anything that could still fail
        ckpt_path.unlink(missing_ok=True)
        from ..report.plots import plot_run

        plot_run(record, out_dir)  # the method's figures (HTA: householder_rank.png)
        print(f"[peft-vit] {label} | {eval_key} {record.accuracy:.2f}% (last epoch) | best over epochs "
              f"{best['acc']:.2f}% at epoch {best['epoch']} (selects on {data.eval_split}) | "
              f"trainable params {counts['trainable_params']:,} ({counts['trainable_params_no_head']:,} without head)"
              f" | {record.wall_time_s:.0f}s -> {result_path}")
        logger.summary({eval_key: record.accuracy, "best_acc_over_epochs": best["acc"],
                        "best_epoch": best["epoch"], "train_images_per_s": record.train_images_per_s,
                        "peak_memory_mb": record.peak_memory_mb})
    logger.finish()
    distributed.shutdown(d)
    sys.stdout.flush()
    return record
