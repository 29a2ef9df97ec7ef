"""The training loop, top to bottom: config -> model -> data -> train/eval -> results.json.

``run`` owns the run dir and calls the steps in order, one function each: ``set_up`` (device,
model, data, the recipe of ``optim.py``), ``resume``, ``start_logging``, ``train`` (per epoch
``train_epoch``, then ``evaluate_epoch`` and ``save_checkpoint`` when due; a stop signal is
answered by ``stop_here`` alone), ``make_record`` and ``finish``. A :class:`Run` carries their
state. The loop draws nothing: the caller (``train.py``) draws figures from the record.

Protocols (named in every output):
  tune   fit train800,       report val200 (``val_acc``)
  final  fit train800val200, report test   (``test_acc``)
The reported accuracy is the last epoch's. ``best_acc_over_epochs`` (the maximum over evaluated
epochs, what most papers report) is recorded too, labelled with the split it selects on.

Resumable: a checkpoint is saved at the end of an epoch once ``trainer.checkpoint_every_s``
seconds have passed since the last (or every ``trainer.checkpoint_every`` epochs) and when the process
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
from ..errors import ConfigValueError, DataMissingError, NonFiniteLossError
from ..fingerprint import fingerprint, result_config
from ..precision import hold_frozen_weights
from ..record import RESULTS, WEIGHTS, RunContext, RunRecord, atomic_file
from . import checkpoint, distributed, rundir
from .logger import RunLogger, git_commit, versions
from .optim import build_optimizer, build_scheduler, check_values
from .signals import StopSignal, ignore_stop_signals_in_worker

log = logging.getLogger("peft_vit")
CHECKPOINT = "checkpoint.pt"


def _precision(pref: str, device: torch.device) -> Optional[torch.dtype]:
    if pref == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[pref]


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
    """``trainer.compile``: ``false`` (the default: a cold compile of ViT-B costs tens of seconds,
    about what a VTAB-1k task's training costs on a recent GPU, and no GPU measurement shows it
    pays yet), ``true``, or ``auto`` (on CUDA only; on CPU it is not measured to help)."""
    if value == "auto":
        return device.type == "cuda"
    if isinstance(value, bool):
        return value
    raise ConfigValueError(f"trainer.compile={value!r}: choose false (the default), true or auto (torch.compile on CUDA only)")


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process, by its own metric (tracing, AOT
    autograd and code generation of forward and backward graphs, recompiles included)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


# torch.compile's backend for the training module: inductor, or the environment's
# PEFT_VIT_COMPILE_BACKEND (e.g. "eager": dynamo's tracing alone, seconds on a CPU, which
# scripts/benchmark_task.py --compile-backend and the compiled-DDP test use); the in-process CPU
# tests set "eager" or a counting backend here
COMPILE_BACKEND = os.environ.get("PEFT_VIT_COMPILE_BACKEND") or "inductor"


class WholeForward(nn.Module):
    """Calls ``model``: compiled, this frame holds the model's forward *and* its hooks (the
    batched layers' pre-hook that computes every factor), so a training step is one graph.
    ``torch.compile(model)`` itself runs a module's hooks outside the compiled frame: the
    factor hook became a graph of its own, handing its outputs to the forward graph as inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def compile_cache(cache_dir) -> None:
    """A persistent inductor cache (FX graphs, kernels; Triton's beside them) under
    ``paths.cache_dir``, unless the environment names another (``TORCHINDUCTOR_CACHE_DIR``). Set
    only when compiling. Inductor writes its default (a temp dir) into the environment when first
    asked, which importing timm already does: that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if cache_dir and os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(os.path.expanduser(str(cache_dir))) / "inductor")


def compile_training(net: nn.Module) -> nn.Module:
    """The training module, compiled once (``net`` is :class:`WholeForward`, DDP-wrapped under
    torchrun). Evaluation never runs through it: it uses the eager model, so the training graph
    never meets ``no_grad`` or an evaluation batch size (each would recompile it)."""
    return torch.compile(net, backend=COMPILE_BACKEND)


def run(cfg: DictConfig, context: Optional[RunContext] = None) -> RunRecord:
    """Train and evaluate one run into its output dir, which it owns while it runs (a lock;
    rank 0 holds it under torchrun). With ``skip_done`` a results.json of the same configuration
    is returned as is; one of another configuration is an error naming the keys that differ.
    ``context`` (``train.py`` takes it from Hydra) defaults to ``cfg.output_dir``, nothing else known."""
    t_start = time.time()
    context = context or RunContext(Path(cfg.get("output_dir") or "."))
    out_dir = Path(context.output_dir)
    result_path = out_dir / RESULTS
    result_cfg = result_config(cfg)
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


class Run:
    """What one run carries from step to step: its config, device, model, data, optimisation
    state and logger, where it starts (``start_epoch``, ``start_step``: 0 or a checkpoint's) and
    what it has done (``history``, ``train_time``, ``images_seen``: what a checkpoint saves besides
    the weights, optimiser and position)."""

    def __init__(self, cfg: DictConfig, context: RunContext, result_cfg, t_start: float):
        self.cfg, self.tcfg, self.context, self.result_cfg, self.t_start = cfg, cfg.trainer, context, result_cfg, t_start
        self.out_dir = Path(context.output_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT
        self.start_epoch, self.start_step, self.history, self.train_time, self.images_seen = 0, 0, [], 0.0, 0
        self.last_checkpoint = t_start  # for trainer.checkpoint_every_s


def _train(cfg: DictConfig, t_start: float, context: RunContext, result_cfg) -> RunRecord:
    r = Run(cfg, context, result_cfg, t_start)
    set_up(r)
    resume(r)
    start_logging(r)
    train(r)
    record = make_record(r)
    finish(r, record)
    return record


# ---------------------------------------------------------------------------- set-up

def set_up(r: Run) -> None:
    """Device, model, data, optimiser and scheduler; the module that trains (DDP, compiled)."""
    cfg, tcfg = r.cfg, r.tcfg
    check_values(cfg)  # values named by their key, before anything is read or built
    r.d = d = distributed.init(tcfg.device)
    torch.manual_seed(cfg.seed)
    r.amp = _precision(tcfg.precision, d.device)
    checkpoint_every_s(tcfg)  # a bad value is an error before anything is built

    r.data = data_first(cfg)  # everything about the data is checked before the model is built
    r.model = model = build_model(cfg).to(d.device)
    # bf16/fp16: the frozen backbone held in the compute dtype, once (no weight cast per step);
    # trainable parameters stay fp32 masters (peft_vit/precision.py)
    hold_frozen_weights(model, r.amp)
    r.method = getattr(model, "peft_method", None)
    r.counts = count_parameters(model)

    # decoded (in-memory) sets: on the device, no workers; others: DataLoader workers. Batches are
    # functions of (seed, epoch, position) either way (peft_vit.data.loader)
    workers = dict(num_workers=tcfg.num_workers, worker_init_fn=ignore_stop_signals_in_worker)  # main handles signals
    r.train_batches = TrainBatches(r.data.train, tcfg.batch_size, cfg.seed, d.device, d.rank, d.world_size,
                                   tcfg.drop_last, **workers)
    r.eval_batches = EvalBatches(r.data.eval, tcfg.eval_batch_size, d.device, d.rank, d.world_size, **workers)
    r.startup_s = time.time() - r.t_start  # model built, data ready

    r.optimizer = build_optimizer(model, cfg.optim, d.device)
    r.steps_per_epoch = len(r.train_batches)
    r.scheduler = build_scheduler(r.optimizer, cfg.optim, tcfg.epochs, r.steps_per_epoch)
    r.scaler = torch.amp.GradScaler(d.device.type, enabled=r.amp == torch.float16)
    r.criterion = nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing, reduction="sum")
    r.trainable = [p for p in model.parameters() if p.requires_grad]
    # the module that trains: DDP-wrapped under torchrun, compiled with trainer.compile. ``model``
    # stays eager for evaluation, state dicts, merge and report
    r.compiled = compile_enabled(tcfg.get("compile", False), d.device)
    r.net = WholeForward(model) if r.compiled else model
    r.net = distributed.wrap(r.net, d)  # DDP under torchrun (no per-forward buffer broadcast)
    r.compile_time = 0.0  # seconds compiling, left out of train_time (both throughputs exclude it)
    if r.compiled:
        compile_cache(cfg.get("paths", {}).get("cache_dir"))
        r.net = compile_training(r.net)


def data_first(cfg: DictConfig):
    """The run's datasets, read and checked before the model is built or its weights are read. When
    the data is missing and the weights cannot be had either, one error names both."""
    from ..backbone import weights_problem

    try:
        return build_datasets(cfg)
    except DataMissingError as e:
        weights = weights_problem(**OmegaConf.to_container(cfg.model, resolve=True))
        if weights is None:
            raise
        raise DataMissingError(f"{e}\nThe weights are missing too: {weights}") from e


def start_logging(r: Run) -> None:
    """The run logger (rank 0 only) and the run's opening line."""
    cfg, d, counts = r.cfg, r.d, r.counts
    r.run_cfg = OmegaConf.to_container(cfg, resolve=True)
    r.eval_key = "val_acc" if cfg.protocol == "tune" else "test_acc"
    r.label = f"{cfg.protocol}: fit {r.data.train_split}, eval {r.data.eval_split}"
    r.logger = RunLogger(cfg.logger, r.run_cfg, r.out_dir, name=f"{cfg.method.name}/{cfg.dataset.task}/s{cfg.seed}",
                         group=r.context.sweep, tags=[cfg.method.name, cfg.dataset.task, cfg.protocol]) \
        if d.is_main else RunLogger({"name": "none"}, {}, r.out_dir, "", None, [])
    r.logger.summary({**counts, "protocol": cfg.protocol})
    if d.is_main:
        print(f"[peft-vit] {cfg.method.name} on {cfg.dataset.name}/{cfg.dataset.task} | protocol {r.label} | "
              f"trainable {counts['trainable_params']:,} ({counts['trainable_params_no_head']:,} without head) "
              f"of {counts['total_params']:,} | {d.world_size} process(es) on {d.device}")


# ---------------------------------------------------------------------------- checkpoints

def resume(r: Run) -> None:
    """Continue from the run dir's checkpoint, if ``trainer.resume`` allows and it is this
    configuration's (``checkpoint.resume_state``)."""
    state = checkpoint.resume_state(r.ckpt_path, r.tcfg.resume, r.result_cfg, r.d.is_main)
    if state is None:
        return
    checkpoint.restore(r.ckpt_path, state, model=r.model, optimizer=r.optimizer, scheduler=r.scheduler, scaler=r.scaler)
    r.start_epoch, r.start_step = state["epoch"], state["step"]
    r.history, r.train_time, r.images_seen = (state["extra"].get(k) for k in ("history", "train_time", "images_seen"))
    if r.d.is_main:
        print(f"[peft-vit] resumed from {r.ckpt_path} at epoch {r.start_epoch}, step {r.start_step}")


def checkpoint_every_s(tcfg) -> Optional[float]:
    every_s = tcfg.get("checkpoint_every_s")
    if every_s is not None and (isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or every_s <= 0):
        raise ValueError(f"trainer.checkpoint_every_s={every_s!r}: give a number of seconds > 0, or null (no "
                         f"checkpoints by time)")
    return every_s


def checkpoint_due(r: Run, epoch: int) -> bool:
    """After ``epoch``: when ``trainer.checkpoint_every_s`` seconds (default 600) have passed since
    the run started or last checkpointed, or every ``trainer.checkpoint_every`` epochs if that is
    set (null by default); either null is off. Checked at epoch ends; under torchrun rank 0's
    clock decides for all (one broadcast per epoch)."""
    every, every_s = r.tcfg.get("checkpoint_every"), checkpoint_every_s(r.tcfg)
    by_time = every_s is not None and distributed.rank0_decides(time.time() - r.last_checkpoint >= every_s, r.d)
    return by_time or bool(every and (epoch + 1) % every == 0)


def save_checkpoint(r: Run, epoch: int, step: int) -> None:
    """The position (``epoch``, ``step``: the next step to run) and everything needed to go on."""
    if r.d.is_main:
        checkpoint.save(r.ckpt_path, model=r.model, optimizer=r.optimizer, scheduler=r.scheduler, scaler=r.scaler,
                        epoch=epoch, step=step,
                        extra=dict(history=r.history, train_time=r.train_time, images_seen=r.images_seen),
                        config=r.result_cfg)
    distributed.barrier(r.d)
    r.last_checkpoint = time.time()


def stop_here(r: Run, stop: StopSignal, epoch: int, step: int) -> None:
    """The one answer to a stop signal: checkpoint at (``epoch``, ``step``), then hand the signal
    on (submitit requeues on SIGUSR2; anything else exits with 128 + signum)."""
    save_checkpoint(r, epoch, step)
    if r.d.is_main:
        print(f"[peft-vit] signal {stop.signum}: checkpoint saved at epoch {epoch}, step {step} in {r.out_dir}; "
              f"the same command resumes it: {resume_command(r.context)}", flush=True)
    stop.forward()


def resume_command(context: RunContext) -> str:
    """The command that continues this run: train.py with the run's own overrides (its dir is a
    function of its configuration, ``hydra.run.dir``)."""
    import shlex

    if context.sweep:
        return f"the sweep's command (sweep {context.sweep}) re-runs only the jobs not done"
    return " ".join(["python train.py", *map(shlex.quote, context.overrides)])


# ---------------------------------------------------------------------------- training

def progress_bar(r: Run):
    """tqdm over all steps. A terminal redraws one line; a log file (SLURM) gets a progress line at
    most every trainer.log_every_s (tqdm's monitor thread forces one every maxinterval: set it too)."""
    from tqdm.auto import tqdm

    tcfg = r.tcfg
    every = 0.2 if sys.stderr.isatty() else float(tcfg.log_every_s)
    return tqdm(total=tcfg.epochs * r.steps_per_epoch, initial=r.start_epoch * r.steps_per_epoch + r.start_step,
                disable=not (tcfg.progress and r.d.is_main), dynamic_ncols=True, desc=r.cfg.method.name,
                mininterval=every, maxinterval=max(every, 10.0))


def train(r: Run) -> None:
    """Epochs from the run's start to ``trainer.epochs``; each is trained, then evaluated and
    checkpointed when due. A stop signal is answered at the next step boundary, or after the
    evaluation in progress (after the last one, the run just finishes)."""
    stop = StopSignal()
    bar = progress_bar(r)
    say = bar.write if sys.stderr.isatty() else print  # one line per evaluation (tqdm.write redraws the bar)
    try:
        for epoch in range(r.start_epoch, r.tcfg.epochs):
            train_epoch(r, epoch, r.start_step if epoch == r.start_epoch else 0, stop, bar)
            last = epoch + 1 == r.tcfg.epochs
            if last or (r.tcfg.eval_every and (epoch + 1) % r.tcfg.eval_every == 0):
                evaluate_epoch(r, epoch, say)
            stopping = stop.signum is not None and not last
            if stopping:
                stop_here(r, stop, epoch + 1, 0)
            elif not last and checkpoint_due(r, epoch):
                save_checkpoint(r, epoch + 1, 0)
    finally:
        bar.close()
        stop.restore()


def train_epoch(r: Run, epoch: int, first: int, stop: StopSignal, bar) -> None:
    """One epoch's steps from step ``first``."""
    tcfg, d, optimizer = r.tcfg, r.d, r.optimizer
    r.net.train()
    t0, c0 = time.time(), compile_seconds()
    for step, (x, y) in enumerate(r.train_batches.epoch(epoch, first), start=first):  # on the device
        global_n = min(tcfg.batch_size, len(r.data.train) - step * tcfg.batch_size)
        with torch.autocast(d.device.type, dtype=r.amp or torch.float32, enabled=r.amp is not None):
            # sum over the local share / global batch, times world (DDP averages grads):
            # the gradient of the global batch mean, whatever the process count
            loss = r.criterion(r.net(x), y) * (d.world_size / global_n)
        optimizer.zero_grad(set_to_none=True)
        r.scaler.scale(loss).backward()
        if tcfg.grad_clip:
            r.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(r.trainable, tcfg.grad_clip)
        r.scaler.step(optimizer)
        r.scaler.update()
        gstep = epoch * r.steps_per_epoch + step + 1
        r.scheduler.step_update(gstep)
        r.images_seen += global_n
        bar.update(1)
        # the loss is read back (a device sync) every 10 steps, at an epoch's end and before a
        # checkpoint, not every step: a non-finite loss stops the run within 10 steps
        if gstep % 10 == 0 or step + 1 == r.steps_per_epoch or stop.signum is not None:
            log_loss(r, loss, epoch, step, gstep, bar)
        if stop.signum is not None:
            add_train_time(r, t0, c0)
            stop_here(r, stop, epoch, step + 1)
            t0, c0 = time.time(), compile_seconds()
    add_train_time(r, t0, c0)


def add_train_time(r: Run, t0: float, c0: float) -> None:
    """The seconds since ``t0`` into ``train_time``, less those torch.compile spent compiling
    since ``c0`` (into ``compile_time``)."""
    compiling = compile_seconds() - c0
    r.compile_time += compiling
    r.train_time += time.time() - t0 - compiling


def log_loss(r: Run, loss: torch.Tensor, epoch: int, step: int, gstep: int, bar) -> None:
    loss_value = loss.item() / r.d.world_size
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch}, step {step}; lower optim.lr")
    lr_now = r.optimizer.param_groups[0]["lr"]
    bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", lr=f"{lr_now:.2e}",
                    refresh=False)  # shown with the next (rate-limited) update
    if gstep % 10 == 0:
        r.logger.log({"train/loss": loss_value, "train/lr": lr_now, "epoch": epoch}, step=gstep)


def evaluate_epoch(r: Run, epoch: int, say) -> None:
    """Evaluate after ``epoch`` into the history. Evaluation draws nothing from the training RNG
    (dropout, drop-path), whatever its loader does (a DataLoader without a generator seeds its
    workers from the global RNG, once per epoch or, with persistent workers, once per process: a
    resumed run would differ)."""
    with torch.random.fork_rng(devices=[]):
        acc = evaluate(r.model, r.eval_batches, r.d, r.amp)  # eager: the training graph stays as it is
    r.history.append({"epoch": epoch + 1, "acc": acc})
    r.logger.log({f"eval/{r.eval_key}": acc, "epoch": epoch + 1}, step=(epoch + 1) * r.steps_per_epoch)
    say(f"[peft-vit] epoch {epoch + 1}: {r.data.eval_split} acc {acc:.2f}%  [{r.cfg.protocol}]")


# ---------------------------------------------------------------------------- the record

def make_record(r: Run) -> RunRecord:
    """The run's :class:`RunRecord`: the last epoch's accuracy, the best over epochs (labelled
    with the split it selects on), counts, speed, memory, versions and the config."""
    cfg, d, data, history, counts = r.cfg, r.d, r.data, r.history, r.counts
    best = max(history, key=lambda h: h["acc"])
    peak_mb = (torch.cuda.max_memory_allocated(d.device) / 2**20 if d.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return RunRecord(
        method=cfg.method.name, dataset=cfg.dataset.name, task=cfg.dataset.task, protocol=cfg.protocol,
        seed=cfg.seed, train_split=data.train_split, eval_split=data.eval_split,
        **{r.eval_key: history[-1]["acc"]},
        accuracy_is=f"last epoch ({history[-1]['epoch']}), {data.eval_split} split",
        best_acc_over_epochs=best["acc"], best_epoch=best["epoch"], best_acc_selects_on=data.eval_split,
        epochs=r.tcfg.epochs, history=history, **counts,
        wall_time_s=round(time.time() - r.t_start, 2),
        train_images_per_s=round(r.images_seen / max(r.train_time, 1e-9), 2),
        startup_s=round(r.startup_s, 2), eval_images_per_s=r.eval_batches.images_per_s,
        peak_memory_mb=round(peak_mb, 1),
        peak_memory_kind="cuda_max_allocated" if d.device.type == "cuda" else "cpu_max_rss",
        world_size=d.world_size, device=str(d.device),
        compiled=r.compiled, compile_time_s=round(r.compile_time, 2),
        experiment=r.context.experiment, sweep=r.context.sweep, overrides=list(r.context.overrides),
        git_commit=git_commit(), versions=versions(),
        config=r.run_cfg, config_fingerprint=fingerprint(r.result_cfg),
        diagnostics=r.method.report(r.model) if r.method is not None and d.is_main else {},
    )


def finish(r: Run, record: RunRecord) -> None:
    """Rank 0 writes the weights, then the record (atomically, before anything that could still
    fail), then deletes the checkpoint: a kill between any two leaves a state the next launch
    finishes or skips. Figures are the caller's (``train.py``)."""
    if r.d.is_main:
        if r.tcfg.save_weights:  # the trained parameters, for scripts/export_merged.py
            from safetensors.torch import save as safetensors_bytes

            with atomic_file(r.out_dir / WEIGHTS, "wb") as f:
                f.write(safetensors_bytes(checkpoint.trainable_state(r.model)))
        result_path = r.out_dir / RESULTS
        record.write(result_path)
        r.ckpt_path.unlink(missing_ok=True)
        best = max(r.history, key=lambda h: h["acc"])
        counts = r.counts
        print(f"[peft-vit] {r.label} | {r.eval_key} {record.accuracy:.2f}% (last epoch) | best over epochs "
              f"{best['acc']:.2f}% at epoch {best['epoch']} (selects on {r.data.eval_split}) | "
              f"trainable params {counts['trainable_params']:,} ({counts['trainable_params_no_head']:,} without head)"
              f" | {record.wall_time_s:.0f}s -> {result_path}")
        r.logger.summary({r.eval_key: record.accuracy, "best_acc_over_epochs": best["acc"],
                          "best_epoch": best["epoch"], "train_images_per_s": record.train_images_per_s,
                          "peak_memory_mb": record.peak_memory_mb})
    r.logger.finish()
    distributed.shutdown(r.d)
    sys.stdout.flush()
