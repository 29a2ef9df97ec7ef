"""A run dir's state: damaged or foreign checkpoints and records are never used silently
(trainer.resume=auto|never|require, config fingerprints, skip_done), a live run owns its dir
(lock), workers ignore stop signals, and a log file gets rate-limited progress lines."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, compose

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = ["model=vit_tiny_test", "dataset=demo/digits", "logger=none", "trainer.num_workers=0", "trainer.progress=false",
        "trainer.batch_size=128", "protocol=tune", "trainer.epochs=1", "trainer.save_weights=false"]


def train(run_dir, *args, ok=True, timeout=300):
    r = subprocess.run([sys.executable, "train.py", *FAST, f"hydra.run.dir={run_dir}", *args], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# ------------------------------------------------------------------ fingerprints
def test_fingerprint_ignores_how_and_where_but_names_what_differs():
    from peft_vit.fingerprint import config_diff, fingerprint, result_config

    a = result_config(compose("method=lora", "dataset=vtab/cifar"))
    same = result_config(compose("method=lora", "dataset=vtab/cifar", "trainer.num_workers=1", "trainer.progress=false",
                                 "logger=none", "paths.output_root=/elsewhere", "skip_done=false",
                                 "trainer.resume=never", "trainer.log_every_s=5", "dataset.root=/data/vtab"))
    assert fingerprint(a) == fingerprint(same)
    b = result_config(compose("method=householder", "dataset=vtab/cifar"))
    assert fingerprint(a) != fingerprint(b)
    diff = "\n".join(config_diff(a, b))
    assert "method.name: 'lora' -> 'householder'" in diff and "method.rank" in diff
    assert not any(k.startswith(("trainer.num_workers", "logger", "paths", "hydra")) for k in a)


def test_finished_record_refuses_a_record_of_another_config(tmp_path):
    from omegaconf import OmegaConf

    from peft_vit.engine.rundir import ForeignStateError, finished_record, result_config
    from peft_vit.record import write_json_atomic

    cfg = compose("method=lora", "dataset=vtab/cifar")
    path = tmp_path / "results.json"
    assert finished_record(path, result_config(cfg)) is None
    write_json_atomic(path, {"test_acc": 1.0, "config": OmegaConf.to_container(_no_hydra(cfg), resolve=True)})
    assert finished_record(path, result_config(cfg))["test_acc"] == 1.0
    other = result_config(compose("method=lora", "dataset=vtab/cifar", "method.rank=4"))
    with pytest.raises(ForeignStateError, match=r"(?s)results.json .*different configuration.*method.rank: 8 -> 4"
                                                r".*skip_done=false"):
        finished_record(path, other)
    path.write_text("{ trunc")
    with pytest.raises(ForeignStateError, match=r"results.json .*results.json is unreadable"):
        finished_record(path, other)


def _no_hydra(cfg):
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# ------------------------------------------------------------------ damaged checkpoints
def _model_state():
    from omegaconf import OmegaConf

    from peft_vit.engine.optim import build_scheduler

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = build_scheduler(opt, OmegaConf.create(dict(lr=1e-3, warmup_epochs=0, warmup_lr=0.0, min_lr=0.0)), 2, 2)
    return dict(model=model, optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_optimiser_state_of_another_packing_is_named(tmp_path):
    """A checkpoint saved before a method's parameters were packed (FacT-TT without its batched
    plan: one tensor per core) does not resume into the packed model: one clear error, nothing loaded."""
    from test_weights import _build

    from peft_vit.engine import checkpoint

    path = tmp_path / "checkpoint.pt"
    state = _model_state()
    plain = _build("fact_tt", batched=False)
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
    checkpoint.save(path, epoch=1, step=0, config={"a": 1}, **dict(state, model=plain, optimizer=plain_opt))
    packed = _build("fact_tt")
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    opt = torch.optim.AdamW([p for p in packed.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(checkpoint.CheckpointUnreadable, match=r"(?s)optimiser state holds 12 tensors, this model "
                                                              r"trains 5.*trainer.resume=never"):
        checkpoint.restore(path, checkpoint.read(path), model=packed, optimizer=opt, scheduler=state["scheduler"],
                           scaler=state["scaler"])
    assert all(torch.equal(v, packed.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign_pickle"])
def test_unreadable_checkpoint_is_named_with_the_choices(tmp_path, damage, capsys):
    from peft_vit.engine import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, epoch=1, step=0, config={"a": 1}, **_model_state())
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04garbage" * 10)
    else:
        torch.save({"something": "else"}, path)
    with pytest.raises(checkpoint.CheckpointUnreadable) as e:
        checkpoint.resume_state(path, "require", {"a": 1})
    msg = str(e.value)
    assert str(path) in msg and "trainer.resume=auto" in msg and "trainer.resume=never" in msg and "delete" in msg
    assert path.exists()
    # auto: moved aside with a warning, start over
    assert checkpoint.resume_state(path, "auto", {"a": 1}) is None
    assert not path.exists() and len(list(tmp_path.glob("checkpoint.pt.unreadable-*"))) == 1
    assert "WARNING" in capsys.readouterr().err


def test_resume_modes_and_foreign_checkpoint(tmp_path):
    from peft_vit.engine import checkpoint
    from peft_vit.engine.rundir import ForeignStateError

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(FileNotFoundError, match="trainer.resume=require"):
        checkpoint.resume_state(path, "require", {"a": 1})
    assert checkpoint.resume_state(path, "auto", {"a": 1}) is None
    checkpoint.save(path, epoch=1, step=3, config={"a": 1, "method.name": "lora"}, **_model_state())
    assert checkpoint.resume_state(path, "require", {"a": 1, "method.name": "lora"})["step"] == 3
    assert checkpoint.resume_state(path, "never", {"a": 1, "method.name": "lora"}) is None
    for mode in ("auto", "require"):  # another configuration: never resumed silently
        with pytest.raises(ForeignStateError, match=r"(?s)checkpoint .* different configuration.*"
                                                    r"method.name: 'lora' -> 'householder'.*trainer.resume=never"):
            checkpoint.resume_state(path, mode, {"a": 1, "method.name": "householder"})
    with pytest.raises(ValueError, match="trainer.resume='sometimes'"):
        checkpoint.resume_state(path, "sometimes", {})


# ------------------------------------------------------------------ the lock
_HOLD = """
import sys, time
from peft_vit.engine.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_lock_names_the_live_owner_and_takes_over_a_dead_ones(tmp_path):
    from peft_vit.engine.rundir import RunDirBusy, RunLock

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"in use by pid {holder.pid} on host {os.uname().nodename}"):
            RunLock(tmp_path).acquire()
        holder.kill()  # SIGKILL: the lock file stays, naming a dead process
        holder.wait()
        assert f"pid {holder.pid}" in (tmp_path / ".lock").read_text()
        lock = RunLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in lock.previous  # taken over, and said so
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
        lock.release()
        assert not (tmp_path / ".lock").exists()
    finally:
        holder.kill()


# ------------------------------------------------------------------ workers and signals
def test_worker_init_ignores_stop_signals():
    code = ("import os, signal, time\n"
            "from peft_vit.engine.signals import ignore_stop_signals_in_worker\n"
            "ignore_stop_signals_in_worker(0)\n"
            "for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT): os.kill(os.getpid(), s)\n"
            "time.sleep(0.2); print('alive')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "alive", r.stderr


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def damaged_then_finished(tmp_path_factory):
    """A run dir holding a garbage checkpoint.pt, launched with trainer.resume=require (fails),
    then with the default auto (moves it aside, runs; progress on, into a log file)."""
    d = tmp_path_factory.mktemp("state") / "run"
    d.mkdir()
    (d / "checkpoint.pt").write_bytes(b"not a checkpoint")
    required = train(d, "method=linear", "trainer.resume=require", ok=False)
    auto = train(d, "method=linear", "trainer.progress=true", "trainer.epochs=4", "trainer.eval_every=1",
                 "trainer.log_every_s=3600")
    return d, required, auto


@pytest.mark.slow
def test_damaged_checkpoint_end_to_end(damaged_then_finished):
    d, required, auto = damaged_then_finished
    err = required.stdout + required.stderr
    assert f"checkpoint {d / 'checkpoint.pt'} is unreadable" in err and "trainer.resume=auto" in err, err[-3000:]
    assert "moved it to" in auto.stderr and (d / "results.json").exists()
    assert len(list(d.glob("checkpoint.pt.unreadable-*"))) == 1 and not (d / "checkpoint.pt").exists()


@pytest.mark.slow
def test_log_file_gets_rate_limited_progress_and_one_line_per_evaluation(damaged_then_finished):
    """Not a terminal: one progress line at the start and one at the end within log_every_s,
    whatever the number of steps; each evaluation one line on stdout."""
    r = damaged_then_finished[2]
    bars = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.startswith("linear:")]
    assert len(bars) == 2, bars  # 24 steps, two lines
    assert "24/24" in bars[-1] and "loss=" in bars[-1]
    evals = [ln for ln in r.stdout.splitlines() if "[peft-vit] epoch" in ln]
    assert [ln.split(":")[0] for ln in evals] == [f"[peft-vit] epoch {e}" for e in (1, 2, 3, 4)]


@pytest.mark.slow
def test_skip_done_runs_only_the_same_config(damaged_then_finished):
    d = damaged_then_finished[0]
    before = (d / "results.json").stat().st_mtime_ns
    same = ["method=linear", "trainer.epochs=4", "trainer.eval_every=1"]
    r = train(d, *same, "trainer.num_workers=1", "trainer.progress=true")  # keys that do not change results
    assert "skip:" in r.stdout and (d / "results.json").stat().st_mtime_ns == before
    r = train(d, *same[1:], "method=full", ok=False)  # another method: refused, naming the key
    err = r.stdout + r.stderr
    assert "different configuration" in err and "method.name: 'linear' -> 'full'" in err, err[-3000:]
    assert json.loads((d / "results.json").read_text())["method"] == "linear"
    assert not (d / ".lock").exists()


@pytest.mark.slow
def test_second_launch_into_a_live_run_dir_exits_naming_the_owner(tmp_path):
    d = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *FAST, f"hydra.run.dir={d}", "method=full",
                              "trainer.epochs=40"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        t0 = time.time()
        while not (d / ".lock").exists() and first.poll() is None and time.time() - t0 < 120:
            time.sleep(0.2)
        r = train(d, "method=full", "trainer.epochs=40", ok=False, timeout=120)
        err = r.stdout + r.stderr
        assert f"is in use by pid {first.pid} on host" in err, err[-3000:]
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait()


def test_stop_signal_flags_then_second_ctrl_c_interrupts():
    import signal

    from peft_vit.engine.signals import StopSignal

    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # flagged; the loop checkpoints at the next boundary
        stop.signum = None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: at once
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(SystemExit) as e:  # no earlier handler to hand it to: exit 128 + signum
            stop.forward()
        assert e.value.code == 128 + signal.SIGINT
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_checkpoint_due_by_time_by_default_epochs_on_request():
    """trainer.checkpoint_every_s (600 s by default) at epoch ends; trainer.checkpoint_every
    (null by default) every N epochs; a bad value names the key and the fix."""
    import time
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from peft_vit.engine import loop
    from peft_vit.engine.distributed import Dist

    tcfg = compose().trainer
    assert tcfg.checkpoint_every_s == 600 and tcfg.checkpoint_every is None
    r = SimpleNamespace(tcfg=tcfg, d=Dist(), last_checkpoint=time.time())
    assert not any(loop.checkpoint_due(r, e) for e in range(30))
    r.last_checkpoint -= 601
    assert loop.checkpoint_due(r, 0)
    r.tcfg = OmegaConf.create(dict(checkpoint_every_s=None, checkpoint_every=3))
    assert [e for e in range(9) if loop.checkpoint_due(r, e)] == [2, 5, 8]
    r.tcfg = OmegaConf.create(dict(checkpoint_every_s=None, checkpoint_every=None))
    assert not any(loop.checkpoint_due(r, e) for e in range(9))  # only when told to stop
    r.tcfg = OmegaConf.create(dict(checkpoint_every_s=0, checkpoint_every=None))
    with pytest.raises(ValueError, match=r"trainer.checkpoint_every_s=0: give a number of seconds > 0, or null"):
        loop.checkpoint_due(r, 0)
