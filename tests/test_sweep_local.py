"""Multirun sweeps on one machine: `python train.py -m hydra/launcher=local ...` (submitit's local
executor through hydra_plugins/peft_vit_launcher.py's LocalLauncher): a 2 methods x 2 VTAB tasks sweep on
generated image folders completes, scripts/make_table.py renders it, a re-launch runs nothing,
and a job that dies without a result is reported instead of hanging the sweep.

The helpers here (generated VTAB folders, the sweep command line) are shared with test_slurm.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
TASKS = {"cifar": 100, "dtd": 47}  # the two generated tasks and their class counts
# tiny and fast: a 2-block ViT on 32 px, 2 epochs of 2 steps; evaluated every epoch
FAST = ["model=vit_tiny_test", "logger=none", "trainer.num_workers=0", "trainer.epochs=2", "trainer.batch_size=32",
        "trainer.eval_batch_size=64", "trainer.eval_every=1", "trainer.progress=false"]


def job_env() -> Dict[str, str]:
    """Environment for train.py and its jobs: offline, one thread each (2 jobs on 2 cores, and
    results that do not depend on how many jobs share the machine)."""
    # no ambient SLURM job or cluster settings leak in; SLURM_CONF is the private test cluster's
    # (set by test_slurm.py's slurm_cluster fixture) or absent
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    return env


def make_vtab(root: Path, tasks: Dict[str, int] = TASKS, n_train: int = 64, n_test: int = 48, size: int = 32) -> Path:
    """NOAH-layout VTAB folders with random JPEGs: <root>/<task>/{train800,val200,train800val200,test}.txt.
    Sizes are far below VTAB-1k's (the reader only warns)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for task, n_cls in tasks.items():
        d = root / task
        n = {"train800": n_train * 4 // 5, "val200": n_train - n_train * 4 // 5, "test": n_test}
        lines = {}
        for split, count in n.items():
            (d / "images" / split).mkdir(parents=True, exist_ok=True)
            lines[split] = []
            for i in range(count):
                label = int(rng.integers(n_cls))
                # a class-dependent mean colour, so there is something to learn
                img = rng.normal(128 + (label % 8) * 12, 40, (size, size, 3)).clip(0, 255).astype("uint8")
                rel = f"images/{split}/{i:06d}.jpg"
                Image.fromarray(img).save(d / rel, quality=90)
                lines[split].append(f"{rel} {label}")
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, ls in lines.items():
            (d / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return root


def sweep_args(sweep_dir: Path, launcher: str, data_root: Path, methods: str = "linear,full",
               tasks: Sequence[str] = tuple(TASKS), extra: Sequence[str] = ()) -> List[str]:
    return [sys.executable, str(REPO / "train.py"), "-m", f"hydra/launcher={launcher}",
            f"method={methods}", "dataset=" + ",".join(f"vtab/{t}" for t in tasks), f"dataset.root={data_root}",
            "dataset.prepare_if_missing=false", *FAST, f"hydra.sweep.dir={sweep_dir}", *extra]


def run(cmd: List[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout, **kw)
    p.elapsed = time.time() - t0  # type: ignore[attr-defined]
    return p


def results(sweep_dir: Path) -> Dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted(Path(sweep_dir).rglob("results.json"))}


def check_table(sweep_dir: Path, out: Path, tasks: Sequence[str] = tuple(TASKS)) -> str:
    """scripts/make_table.py on the sweep: exits 0 and its VTAB table has a row per method and
    a column per task."""
    p = run([sys.executable, str(REPO / "scripts" / "make_table.py"), str(sweep_dir), "--out", str(out),
             "--format", "md,csv"], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (out / "vtab.md").read_text()
    for word in ("linear", "full", *tasks):
        assert word in md, f"{word!r} missing from the table:\n{md}"
    assert (out / "vtab.csv").stat().st_size > 0
    return md


def check_sweep(sweep_dir: Path, methods=("linear", "full"), tasks: Sequence[str] = tuple(TASKS)) -> Dict[Path, dict]:
    res = results(sweep_dir)
    got = sorted((r["method"], r["task"]) for r in res.values())
    assert got == sorted((m, t) for m in methods for t in tasks), got
    for r in res.values():
        assert r["protocol"] == "final" and len(r["history"]) == 2 and 0 <= r["test_acc"] <= 100
    return res


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    return make_vtab(tmp_path_factory.mktemp("vtab-1k"))


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, vtab_root):
    sweep = tmp_path_factory.mktemp("sweep-local")
    cmd = sweep_args(sweep, "local", vtab_root, extra=["hydra.launcher.array_parallelism=2",
                                                       "hydra.launcher.gpus_per_node=0"])
    p = run(cmd, timeout=900)
    return sweep, cmd, p


@pytest.mark.slow
def test_local_sweep_2x2_completes_and_renders(local_sweep, tmp_path):
    sweep, _, p = local_sweep
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "4 of 4 jobs completed" in p.stderr + p.stdout
    check_sweep(sweep)
    # each job ran in its own process (submitit folder per job)
    assert len([d for d in (sweep / ".submitit").iterdir() if d.name != "%j"]) == 4
    check_table(sweep, tmp_path / "report")


@pytest.mark.slow
def test_local_relaunch_runs_nothing(local_sweep):
    sweep, cmd, first = local_sweep
    assert first.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in results(sweep)}
    jobs_before = set((sweep / ".submitit").iterdir())
    p = run(cmd, timeout=300)
    assert p.returncode == 0, p.stderr[-5000:]
    log = p.stdout + p.stderr
    assert log.count("[skip: ") == 4 and "4 of 4 jobs completed" in log, log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in results(sweep)} == before  # nothing re-trained
    assert set((sweep / ".submitit").iterdir()) == jobs_before  # nothing even started


@pytest.mark.slow
def test_local_relaunch_with_another_config_is_refused_not_skipped(local_sweep):
    """The same sweep dir, re-launched after a setting changed (as when a preset is edited; here
    optim.lr, kept out of the job dir names): the launcher's skip_done compares config
    fingerprints as the loop does, so the old records are neither returned nor overwritten, and
    nothing is submitted; the error names the key that differs."""
    sweep, cmd, first = local_sweep
    assert first.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in results(sweep)}
    jobs_before = set((sweep / ".submitit").iterdir())
    from peft_vit.fingerprint import RUNTIME_KEYS

    exclude = f"hydra.job.config.override_dirname.exclude_keys=[{','.join(RUNTIME_KEYS + ('optim.lr',))}]"
    p = run([*cmd, "optim.lr=0.5", exclude], timeout=300)
    log = p.stdout + p.stderr
    assert p.returncode != 0, log[-3000:]
    assert log.count("[refused: ") == 4 and "optim.lr: " in log and "-> 0.5" in log, log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in results(sweep)} == before
    assert set((sweep / ".submitit").iterdir()) == jobs_before  # nothing submitted


def _children(pid: int) -> List[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids]


@pytest.mark.slow
def test_local_job_killed_is_reported_not_waited_for(tmp_path, vtab_root):
    """SIGKILL the job's training process: the launcher reports it (job id, 'without writing a
    result', its log) within lost_after_s and the sweep exits non-zero, instead of hanging."""
    sweep = tmp_path / "sweep"
    cmd = sweep_args(sweep, "local", vtab_root, methods="full", tasks=["cifar"],
                     extra=["trainer.epochs=200", "hydra.launcher.gpus_per_node=0", "hydra.launcher.poll_s=0.5",
                            "hydra.launcher.lost_after_s=3"])
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = None
        while time.time() - t0 < 240 and victim is None:
            for log in (sweep / ".submitit").glob("*/*_log.out"):
                if "[peft-vit] full on vtab/cifar" in log.read_text(errors="replace"):
                    controller = int(log.parent.name)  # local job id = the controller's pid
                    kids = _children(controller)
                    victim = kids[0] if kids else None
            time.sleep(0.5)
        assert victim is not None, "the job never started training"
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "ended without writing a result" in out and "JobDiedError" in out, out[-4000:]
    assert time.time() - killed < 60
    assert not results(sweep)
