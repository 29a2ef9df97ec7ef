"""SLURM sweeps on a real single-node SLURM cluster (scripts/slurm_local.sh: Debian's munge,
slurmctld, slurmd, slurmdbd + MariaDB, started here if not running), through
configs/hydra/launcher/slurm.yaml and hydra_plugins/peft_vit_launcher.py's SlurmLauncher.

Opt-in: these tests run only with PEFT_VIT_SLURM_TESTS=1 (.ci/run sets it; conftest.py skips
them otherwise and says so in one line). They talk only to the private cluster the script
starts: every SLURM command gets SLURM_CONF=<its dir>/slurm.conf, and before any submission
`scontrol show config` must report that file, the cluster name and the script's own port, so
an ambient cluster (a login node's) is never reached. What they cover:

* a 2 methods x 2 VTAB tasks multirun runs as one job array and completes; make_table renders it;
* re-launching the finished sweep submits nothing (skip_done);
* a job sent `scancel --signal=USR2` mid-training checkpoints, is requeued by submitit, resumes
  and ends with exactly the numbers of an uninterrupted run;
* a job killed without writing a result (`scancel`) is reported within lost_after_s and the
  sweep exits non-zero instead of hanging.

The cluster needs root and apt-get (or the packages already installed); opted in without them,
the cluster tests fail. The launcher's logic (scheduler output, the wait) is unit-tested without
a cluster in tests/test_launcher_logic.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_sweep_local import (REPO, check_sweep, check_table, job_env, make_vtab, results, run,  # noqa: E402
                              sweep_args)

SCRIPT = REPO / "scripts" / "slurm_local.sh"
# the test cluster has no GPU gres and 2 CPUs: 1 CPU and 1 GB per job, 2 jobs at a time.
# timeout_min=60: submitit counts a SIGUSR2 as a time-out (not a pre-emption) once a job ran
# min(0.8 x limit, limit - 10 min); with 60 min a test signal is a pre-emption.
SLURM = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=60", "hydra.launcher.poll_s=1", "hydra.launcher.lost_after_s=5"]


# ------------------------------------------------------------------ the real cluster
STATE = Path(os.environ.get("SLURM_LOCAL_DIR", "/var/tmp/peft-vit-slurm"))
PRIVATE = {"SLURM_CONF": str(STATE / "slurm.conf"), "ClusterName": "peftvit", "SlurmctldPort": "16817"}


def _private_config() -> dict:
    """`scontrol show config` of the cluster SLURM_CONF points at (as the tests' commands see it)."""
    out = subprocess.run(["scontrol", "show", "config"], env=job_env(), capture_output=True, text=True, timeout=60)
    conf = {}
    for line in out.stdout.splitlines():
        if " = " in line:
            k, v = line.split(" = ", 1)
            conf[k.strip()] = v.strip()
    return conf


def _check_private_cluster() -> None:
    """Before any submission: the cluster SLURM_CONF leads to is the private test cluster."""
    conf = _private_config()
    got = {k: conf.get(k) for k in PRIVATE}
    assert got == PRIVATE, f"not the private test cluster of scripts/slurm_local.sh: {got}; refusing to submit"
    assert "127.0.0.1" in conf.get("SlurmctldHost[0]", ""), conf.get("SlurmctldHost[0]")


def _accounting() -> bool:
    """sacct works (scripts/slurm_local.sh runs slurmdbd unless SLURM_LOCAL_NO_DBD=1)."""
    return subprocess.run(["sacct", "-n", "-X", "-S", "now"], env=job_env(), capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """scripts/slurm_local.sh start (installs the Debian packages if missing), then SLURM_CONF
    for every command of this session, checked against the private cluster before any job is
    submitted; stopped at the end only if this session started it."""
    have_pkgs = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadbd"))
    if not have_pkgs and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.fail("PEFT_VIT_SLURM_TESTS=1, but the local SLURM cluster needs root and apt-get (Debian/Ubuntu) to "
                    "install munge/slurmctld/slurmd/slurmdbd/mariadb-server")
    env = {**job_env(), "SLURM_LOCAL_DIR": str(STATE)}
    running = have_pkgs and subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True).returncode == 0
    if not running:
        if os.geteuid() != 0:
            pytest.fail("PEFT_VIT_SLURM_TESTS=1, but scripts/slurm_local.sh start needs root")
        p = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"scripts/slurm_local.sh start failed:\n{p.stdout}\n{p.stderr}"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = PRIVATE["SLURM_CONF"]  # job_env() passes it to every command and job
    try:
        _check_private_cluster()
        yield
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if not running:
            subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def _fake_slurm_bin(tmp_path: Path, scontrol_out: str = "") -> Path:
    """A bin dir whose SLURM, apt and daemon commands only record that they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun", "squeue", "sacct", "sinfo", "scancel", "scontrol", "apt-get", "slurmctld",
                 "slurmd", "munged", "mariadbd", "slurmdbd"):
        out = scontrol_out if name == "scontrol" else ""
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} >> {tmp_path / 'called'}\nprintf '%s' '{out}'\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_plain_pytest_touches_no_cluster_and_says_what_it_skipped(tmp_path):
    """Without PEFT_VIT_SLURM_TESTS=1 the cluster tests run no SLURM, apt or daemon command (all
    are faked here and record any call), and the summary says so in one line."""
    env = {k: v for k, v in job_env().items() if k != "PEFT_VIT_SLURM_TESTS"}
    env["PATH"] = f"{_fake_slurm_bin(tmp_path)}:{env['PATH']}"
    env["SLURM_LOCAL_DIR"] = str(tmp_path / "state")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                        "-k", "slurm_sweep_runs or usr2 or killed_job"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "skipped 3 SLURM cluster tests: set PEFT_VIT_SLURM_TESTS=1" in p.stdout, p.stdout[-3000:]
    assert not (tmp_path / "called").exists() and not (tmp_path / "state").exists()


def test_a_cluster_that_is_not_the_private_one_is_refused(tmp_path, monkeypatch):
    """SLURM_CONF leading to another cluster (a login node's): refused before any submission."""
    other = "ClusterName = prod\nSlurmctldPort = 6817\nSLURM_CONF = /etc/slurm/slurm.conf\n"
    monkeypatch.setenv("PATH", f"{_fake_slurm_bin(tmp_path, other)}:{os.environ['PATH']}")
    with pytest.raises(AssertionError, match="not the private test cluster.*refusing to submit"):
        _check_private_cluster()
    assert (tmp_path / "called").read_text().split() == ["scontrol"]  # asked, nothing submitted


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    return make_vtab(tmp_path_factory.mktemp("vtab-1k"))


@pytest.fixture(scope="module")
def slurm_sweep(slurm_cluster, tmp_path_factory, vtab_root):
    sweep = tmp_path_factory.mktemp("sweep-slurm")
    cmd = sweep_args(sweep, "slurm", vtab_root, extra=SLURM)
    p = run(cmd, timeout=900)
    return sweep, cmd, p


def _job_dirs(sweep: Path):
    """submitit's per-job folders: <job> or, in an array, <array>_<task>."""
    return sorted(d.name for d in (sweep / ".submitit").iterdir() if d.name.replace("_", "").isdigit())


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_runs_as_job_array(slurm_sweep, tmp_path):
    sweep, _, p = slurm_sweep
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "4 of 4 jobs completed" in p.stdout + p.stderr and "submitted slurm job" in p.stdout + p.stderr
    check_sweep(sweep)
    # one array, tasks 0..3: submitit folders <array>_<task>, and SLURM accounting agrees
    dirs = [d for d in _job_dirs(sweep) if "_" in d]
    arrays = {d.split("_")[0] for d in dirs}
    assert len(arrays) == 1 and sorted(d.split("_")[1] for d in dirs) == ["0", "1", "2", "3"], _job_dirs(sweep)
    if _accounting():
        acct = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", arrays.pop()],
                              env=job_env(), capture_output=True, text=True).stdout
        assert len([ln for ln in acct.splitlines() if "_" in ln.split("|")[0]]) == 4, acct
    check_table(sweep, tmp_path / "report")


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_relaunch_runs_nothing(slurm_sweep):
    sweep, cmd, first = slurm_sweep
    assert first.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in results(sweep)}
    dirs = _job_dirs(sweep)
    p = run(cmd, timeout=300)
    assert p.returncode == 0, p.stderr[-5000:]
    log = p.stdout + p.stderr
    assert log.count("[skip: ") == 4 and "submitted slurm job" not in log, log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in results(sweep)} == before
    assert _job_dirs(sweep) == dirs  # no job was submitted


def _wait_for_log(sweep: Path, text: str, timeout: float, proc=None) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for log in (sweep / ".submitit").glob("*/*_log.out"):
            if text in log.read_text(errors="replace"):
                return log
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {text!r} appeared:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.25)
    raise AssertionError(f"{text!r} did not appear in a job log within {timeout} s")


# digits: 1000 training images, 16 steps of 64 per epoch; 4 epochs leave time to signal mid-run
DIGITS = ["model=vit_tiny_test", "dataset=demo/digits", "logger=none", "trainer.num_workers=0", "trainer.epochs=4",
          "trainer.batch_size=64", "trainer.eval_every=1", "trainer.progress=false", "method=full", "seed=0"]


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_requeues_resumes_and_matches_uninterrupted(slurm_cluster, tmp_path, vtab_root):
    """scancel --signal=USR2 mid-run: SLURM signals every process of the job step, the 2
    DataLoader workers (decoding the test images) included; the main process checkpoints,
    submitit requeues, the job resumes and ends with exactly the numbers of an uninterrupted
    run. Meanwhile the launcher itself is killed (a dropped login session) and the sweep
    re-launched: the new launcher waits for the running job instead of submitting it again."""
    sweep = tmp_path / "sweep"
    args = [*DIGITS, "dataset=vtab/cifar", f"dataset.root={vtab_root}", "dataset.cache_dir=null",
            "dataset.prepare_if_missing=false", "trainer.num_workers=2", "trainer.batch_size=16",
            "trainer.eval_batch_size=16", "trainer.epochs=6"]
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", *SLURM, *args,
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the uninterrupted reference run, meanwhile, outside SLURM
    ref = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={tmp_path / 'ref'}"],
                           cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    relaunch = None
    try:
        log = _wait_for_log(sweep, "[peft-vit] epoch 1:", 300, proc)  # mid-training: 3 epochs to go
        job_id = log.parent.name
        subprocess.run(["scancel", "--signal=USR2", job_id], env=job_env(), check=True)
        proc.kill()
        proc.wait(timeout=30)
        relaunch = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        out, _ = relaunch.communicate(timeout=400)
        ref_out, _ = ref.communicate(timeout=300)
    finally:
        for p in (proc, ref, relaunch):
            if p is not None and p.poll() is None:
                p.kill()
    assert relaunch.returncode == 0, out[-5000:]
    assert f"as slurm job {job_id} (an earlier launch" in out and "submitted slurm job" not in out, out[-3000:]
    assert _job_dirs(sweep) == [job_id]  # one job, never submitted twice
    assert ref.returncode == 0, ref_out[-3000:]
    text = log.read_text()
    assert "signal 12: checkpoint saved" in text, text[-3000:]
    assert f"Requeued job {job_id}" in text, text[-3000:]
    assert "[peft-vit] resumed from" in text and text.count("Starting with JobEnvironment") == 2, text[-3000:]
    saved = text.split("signal 12: checkpoint saved at ")[1].split("\n")[0]
    assert not saved.startswith(("epoch 0,", "epoch 6,")), saved  # it was mid-run
    assert "killed by signal" not in text + log.with_name(log.name.replace("_log.out", "_log.err")).read_text()
    if _accounting():
        acct = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State", "-j", job_id],
                              env=job_env(), capture_output=True, text=True).stdout
        assert "REQUEUED" in acct, acct
    (got,) = results(sweep).values()
    want = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert got["history"] == want["history"], (got["history"], want["history"])
    assert got["test_acc"] == want["test_acc"] and got["best_acc_over_epochs"] == want["best_acc_over_epochs"]
    assert not list(sweep.rglob("checkpoint.pt"))  # removed once results.json is written


@pytest.mark.slurm
@pytest.mark.slow
def test_killed_job_is_reported_not_waited_for(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", *SLURM, *DIGITS,
           "trainer.epochs=100", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = _wait_for_log(sweep, "[peft-vit] full on demo/digits", 300, proc)
        job_id = log.parent.name
        subprocess.run(["scancel", job_id], env=job_env(), check=True)
        killed = time.time()
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    waited = time.time() - killed
    assert proc.returncode != 0
    assert f"slurm job {job_id}" in out and "ended without writing a result" in out, out[-4000:]
    assert "CANCELLED" in out and "JobDiedError" in out, out[-4000:]
    assert waited < 60, waited  # lost_after_s=5, poll_s=1
    assert not results(sweep)
