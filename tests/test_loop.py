"""The training loop end to end on the digits demo: it learns, writes a complete record, resumes
bit-identically after SIGTERM, skips finished runs, and DDP equals one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
FAST = ["model=vit_tiny_test", "dataset=demo/digits", "logger=none", "trainer.num_workers=0",
        "trainer.progress=false", "trainer.batch_size=64", "optim.warmup_epochs=1", "optim.lr=2e-3"]


def train(run_dir, *args, timeout=300, launcher=None, env=None):
    cmd = (launcher or [sys.executable]) + ["train.py", *FAST, f"hydra.run.dir={run_dir}", *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def record(run_dir):
    return json.loads((run_dir / "results.json").read_text())


REQUIRED = ["method", "dataset", "task", "protocol", "seed", "config", "best_acc_over_epochs", "best_epoch",
            "trainable_params", "trainable_params_no_head", "total_params", "wall_time_s",
            "train_images_per_s", "peak_memory_mb", "git_commit", "versions"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    r = train(d, "method=full", "trainer.epochs=12", "trainer.eval_every=4")
    return d, r


@pytest.mark.slow
def test_learns_on_digits_and_writes_complete_record(quick_run):
    d, r = quick_run
    rec = record(d)
    for k in REQUIRED:
        assert k in rec, k
    assert rec["protocol"] == "final" and rec["eval_split"] == "test" and rec["train_split"] == "train800val200"
    assert "val_acc" not in rec
    assert rec["test_acc"] > 40, rec["test_acc"]  # chance is 10%; the quickstart (30 epochs) reaches ~90%
    assert rec["best_acc_selects_on"] == "test"
    assert [h["epoch"] for h in rec["history"]] == [4, 8, 12]
    assert rec["best_acc_over_epochs"] == max(h["acc"] for h in rec["history"])
    assert rec["trainable_params"] == rec["total_params"] and rec["trainable_params_no_head"] == rec["total_params"] - 650
    assert rec["config"]["method"]["name"] == "full" and rec["config"]["optim"]["lr"] == 2e-3
    assert "test_acc" in r.stdout and "protocol final" in r.stdout
    assert (d / "trainable.safetensors").exists() and not (d / "checkpoint.pt").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_with_the_fix(tmp_path):
    """The loss is read back every 10 steps, not every step: a diverging run still stops, naming
    the fix, and writes no record."""
    cmd = [sys.executable, "train.py", *FAST, f"hydra.run.dir={tmp_path}", "method=full", "optim.lr=1e6",
           "optim.warmup_epochs=0", "trainer.epochs=2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode != 0 and "NonFiniteLossError: loss is" in r.stderr and "lower optim.lr" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "results.json").exists()


def test_tune_protocol_reports_val(tmp_path):
    train(tmp_path, "method=linear", "protocol=tune", "trainer.epochs=2", "trainer.save_weights=false")
    rec = record(tmp_path)
    assert rec["eval_split"] == "val200" and rec["train_split"] == "train800" and "val_acc" in rec
    assert "test_acc" not in rec and rec["trainable_params"] == 650 and rec["trainable_params_no_head"] == 0


@pytest.mark.slow
def test_skip_done(quick_run):
    d, _ = quick_run
    before = (d / "results.json").stat().st_mtime_ns
    r = train(d, "method=full", "trainer.epochs=12", "trainer.eval_every=4")
    assert "skip" in r.stdout and (d / "results.json").stat().st_mtime_ns == before


def _children(pid):
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


@pytest.mark.slow
def test_sigterm_to_process_group_with_workers_then_relaunch_equals_uninterrupted(tmp_path):
    """As SLURM, `timeout` and container runtimes do: SIGTERM to every process of the run,
    DataLoader workers included (2 workers decode the test images from their folder). The
    workers ignore it, the main process checkpoints and exits; a re-launch ends bit-identical."""
    from test_sweep_local import make_vtab

    root = make_vtab(tmp_path / "vtab", tasks={"cifar": 100}, n_train=64, n_test=240)
    args = ["method=full", "dataset=vtab/cifar", f"dataset.root={root}", "dataset.cache_dir=null",
            "trainer.num_workers=2", "trainer.batch_size=16", "trainer.eval_batch_size=32", "trainer.epochs=5",
            "trainer.eval_every=1", "trainer.checkpoint_every=0", "model.drop_path_rate=0.1"]
    ref = tmp_path / "ref"
    train(ref, *args)
    cut = tmp_path / "cut"
    cmd = [sys.executable, "train.py", *FAST, f"hydra.run.dir={cut}", *args]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                         start_new_session=True)  # its own process group, as a job
    for line in p.stdout:  # after two evaluations: in epoch 3's training or evaluation
        if "epoch 2:" in line:
            time.sleep(0.3)
            workers = _children(p.pid)
            os.killpg(p.pid, signal.SIGTERM)
            break
    out = p.communicate(timeout=120)[0]
    assert len(workers) >= 2, workers  # the signal reached live workers too
    assert p.returncode == 128 + signal.SIGTERM, out
    assert "checkpoint saved at epoch" in out and "killed by signal" not in out, out
    assert (cut / "checkpoint.pt").exists() and not (cut / "results.json").exists()
    r = train(cut, *args)
    assert "resumed from" in r.stdout
    a, b = record(ref), record(cut)
    assert a["history"] == b["history"] and a["test_acc"] == b["test_acc"]
    wa, wb = load_file(ref / "trainable.safetensors"), load_file(cut / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    args = ["method=full", "trainer.epochs=2", "trainer.eval_every=1", "model.drop_path_rate=0.0"]
    one = tmp_path / "one"
    train(one, *args)
    two = tmp_path / "two"
    train(two, *args, launcher=TORCHRUN2)
    a, b = record(one), record(two)
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["history"] == pytest.approx(b["history"], abs=0.5)  # same predictions up to float reduction order
    wa, wb = load_file(one / "trainable.safetensors"), load_file(two / "trainable.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4)


TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.slow
def test_torchrun_two_processes_compiled_equals_eager(tmp_path):
    """trainer.compile=true under torchrun (2 processes, gloo): torch.compile of the DDP-wrapped
    training module (dynamo splits the graph at DDP's buckets) with backend "eager"
    (PEFT_VIT_COMPILE_BACKEND: the traced graphs run as traced, so the same ops in the same
    order). Householder: the batched layers' factor hook inside the compiled frame. It trains, to
    the uncompiled DDP run's result: the same history and bit-identical weights."""
    args = ["method=householder", "trainer.epochs=2", "trainer.eval_every=1", "model.drop_path_rate=0.0"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(eager, *args, launcher=TORCHRUN2)
    train(compiled, *args, "trainer.compile=true", launcher=TORCHRUN2, env={"PEFT_VIT_COMPILE_BACKEND": "eager"})
    a, b = record(eager), record(compiled)
    assert a["world_size"] == b["world_size"] == 2
    assert (a["compiled"], a["compile_time_s"]) == (False, 0) and b["compiled"] is True and b["compile_time_s"] > 0
    assert a["history"] == b["history"] and a["test_acc"] == b["test_acc"]
    wa, wb = load_file(eager / "trainable.safetensors"), load_file(compiled / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), \
        {k: (wa[k] - wb[k]).abs().max().item() for k in wa}
    # it trains: every reflection's d and add-on's w_out starts at zero (the model starts as the
    # backbone) and moved, through the compiled graph with the factor hook in it, under DDP
    zero_init = [k for k in wb if k.endswith((".d", ".w_out"))]
    assert len(zero_init) == 16 and all(wb[k].abs().min() > 0 for k in zero_init)


def test_ddp_arguments_gloo_no_buffer_broadcast_gradients_in_buckets(tmp_path):
    """DDP as the loop wraps it (gloo, one process): constant buffers are not broadcast, gradients
    are views into the buckets, and a training step of VeRA (frozen A and B are buffers) runs."""
    import torch.distributed as dist

    from conftest import build
    from peft_vit.engine import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build("vera")
        ddp = distributed.wrap(model, distributed.Dist(0, 2, 0, torch.device("cpu")))
        assert ddp.forward_sync_buffers is False and ddp.gradient_as_bucket_view is True
        assert any(True for _ in model.buffers())
        ddp(torch.randn(2, 3, 32, 32)).sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert distributed.wrap(model, distributed.Dist(device=torch.device("cpu"))) is model  # one process
    finally:
        dist.destroy_process_group()


def schedule(epochs, steps_per_epoch, **ocfg):
    """The learning rate before each optimiser step of the loop's scheduler."""
    from omegaconf import OmegaConf

    from peft_vit.engine.optim import build_scheduler

    ocfg = OmegaConf.create(dict(lr=1e-3, **ocfg))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=ocfg.lr)
    sched = build_scheduler(opt, ocfg, epochs=epochs, steps_per_epoch=steps_per_epoch)
    lrs = []
    for n in range(epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step_update(n + 1)
    return lrs


def test_schedule_warmup_cosine_cooldown():
    lrs = schedule(12, 5, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=2)
    assert lrs[0] == pytest.approx(1e-6)                            # warm-up starts at warmup_lr
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))          # linear rise, per iteration
    assert all(a >= b for a, b in zip(lrs[10:50], lrs[11:51]))      # cosine decay
    assert lrs[50:] == pytest.approx([1e-5] * 10)                   # cool-down held at min_lr


def test_schedule_restarts():
    """restart_epochs: the cosine restarts from lr every that many epochs, per iteration."""
    sgdr = dict(warmup_epochs=0, warmup_lr=1e-7, min_lr=0.0, cooldown_epochs=0)
    lrs = schedule(12, 4, restart_epochs=5, **sgdr)
    assert lrs[0] == lrs[20] == lrs[40] == pytest.approx(1e-3)        # restarts at epochs 0, 5, 10
    assert lrs[10] == pytest.approx(5e-4) and lrs[30] == pytest.approx(5e-4)  # half-way down each cycle
    for a, b in ((0, 20), (20, 40), (40, 48)):
        assert all(x > y for x, y in zip(lrs[a:b - 1], lrs[a + 1:b]))  # decays within each cycle
    with pytest.raises(ValueError, match="optim.restart_epochs=20"):
        schedule(12, 4, restart_epochs=20, **sgdr)
    with pytest.raises(ValueError, match="optim.restart_epochs=0"):
        schedule(12, 4, restart_epochs=0, **sgdr)
