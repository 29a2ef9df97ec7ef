"""The sweep launchers' logic without a cluster (hydra_plugins/peft_vit_launcher.py): squeue
output parsed from strings, the alive/done/lost verdict, the bounded wait over a scripted
scheduler, the submission prepared as upstream's, not submitted, and the presets. The launchers
on a real SLURM cluster: tests/test_slurm.py; on one machine: tests/test_sweep_local.py."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from hydra_plugins import peft_vit_launcher as L
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as upstream


# ------------------------------------------------------------------ squeue output
def test_parse_states():
    """``squeue -h -r -t all -o %i|%T``: with -r each array task is its own line, pending ones too."""
    out = "73|CANCELLED\n74_2|PENDING\n74_3|PENDING\n74_0|RUNNING\n 74_1|COMPLETING \n\n75|\n"
    assert L.parse_states(out) == {"73": "CANCELLED", "74_2": "PENDING", "74_3": "PENDING", "74_0": "RUNNING",
                                   "74_1": "COMPLETING", "75": ""}
    # an answer that lists nothing: every job is unknown to the scheduler (not "no news")
    assert L.parse_states("") == {}


def test_squeue_failing_is_no_news(monkeypatch):
    """squeue missing or failing (the controller restarting): None, which the wait takes as no news."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert L.SlurmLauncher(submitit_folder="x/%j")._states() is None


# ------------------------------------------------------------------ alive / done / lost
def test_judge():
    j = L.judge
    assert j(True, True, "CANCELLED", 5.0, 100.0, 10) == ("done", 5.0)  # a result decides first
    assert j(True, False, None, None, 0.0, 10)[0] == "done"
    for st in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING", "SUSPENDED"):
        assert j(False, True, st, 50.0, 100.0, 10) == ("alive", None)  # alive again: the clock resets
    # ended or unknown: first seen now, lost once lost_after_s have passed
    assert j(False, True, "CANCELLED", None, 100.0, 10) == ("alive", 100.0)
    assert j(False, True, None, None, 100.0, 10) == ("alive", 100.0)
    assert j(False, True, "", None, 100.0, 10) == ("alive", 100.0)
    assert j(False, True, "OUT_OF_MEMORY", 100.0, 105.0, 10) == ("alive", 100.0)
    assert j(False, True, "CANCELLED", 100.0, 110.0, 10) == ("lost", 100.0)
    assert j(False, True, None, 100.0, 111.0, 10) == ("lost", 100.0)
    # the scheduler did not answer: no news, however long
    assert j(False, False, None, 100.0, 10_000.0, 10) == ("alive", 100.0)


# ------------------------------------------------------------------ the wait, a scripted scheduler
class _FakeJob:
    def __init__(self, job_id: str, folder: Path):
        self.job_id = job_id
        self.paths = SimpleNamespace(result_pickle=folder / f"{job_id}_result.pkl",
                                     stderr=folder / f"{job_id}.err", stdout=folder / f"{job_id}.out")

    def results(self):
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=self.job_id)]


def _waiter(states_seq, tmp_path, lost_after_s=0.3):
    """A SlurmLauncher whose scheduler answers from ``states_seq`` (one dict per poll; a job id
    absent = the scheduler does not know it) and whose job writes its result when the sequence
    says "RESULT"."""

    class Fake(L.SlurmLauncher):
        def _submit(self, slots, executor):
            for s in slots:
                if s.job is None and s.result is None:
                    s.job = _FakeJob(f"7_{s.num}", tmp_path)

        def _states(self, slots):
            step = states_seq.pop(0) if len(states_seq) > 1 else states_seq[0]
            if step is None:  # squeue failed
                return None
            out = {}
            for jid, st in step.items():
                if st == "RESULT":
                    (tmp_path / f"{jid}_result.pkl").write_text("x")
                    st = "COMPLETING"
                out[jid] = st
            return out

    launcher = Fake(poll_s=0.05, lost_after_s=lost_after_s, max_wait_h=None, timeout_min=60, signal_delay_s=90)
    slots = [L._Slot(num=i, overrides=[f"seed={i}"]) for i in range(2)]
    return launcher, slots


def test_wait_reports_job_the_scheduler_forgot(tmp_path):
    """The job vanishes from squeue (purged after MinJobAge) without a result: reported, not waited for."""
    (tmp_path / "7_1.err").write_text("Traceback ...\nMemoryError\n")
    seq = [{"7_0": "RUNNING", "7_1": "RUNNING"}, {"7_0": "RESULT"}]
    launcher, slots = _waiter(seq, tmp_path)
    t0 = time.time()
    launcher._wait(slots, None)
    assert time.time() - t0 < 5
    assert slots[0].result.status == JobStatus.COMPLETED and slots[0].result.return_value == "7_0"
    assert slots[1].result.status == JobStatus.FAILED
    err = slots[1].result._return_value
    assert isinstance(err, L.JobDiedError)
    assert "7_1" in str(err) and "without writing a result" in str(err) and "MemoryError" in str(err)


def test_wait_follows_a_requeued_job(tmp_path):
    """PREEMPTED -> REQUEUED -> PENDING -> RUNNING is not death: waited for, then collected."""
    seq = [{"7_0": "RUNNING", "7_1": "RUNNING"}, {"7_0": "PREEMPTED", "7_1": "RESULT"}, {"7_0": "REQUEUED"}]
    seq += [{"7_0": "PENDING"}] * 10 + [{"7_0": "RUNNING"}] * 3 + [{"7_0": "RESULT"}]
    launcher, slots = _waiter(seq, tmp_path, lost_after_s=0.2)
    launcher._wait(slots, None)
    assert [s.result.status for s in slots] == [JobStatus.COMPLETED] * 2


def test_wait_does_not_bury_jobs_while_the_scheduler_is_silent(tmp_path):
    """squeue failing (controller restarting) is no news, however long it lasts."""
    seq = [{"7_0": "RUNNING", "7_1": "RUNNING"}] + [None] * 20 + [{"7_0": "RESULT", "7_1": "RESULT"}]
    launcher, slots = _waiter(seq, tmp_path, lost_after_s=0.2)
    launcher._wait(slots, None)
    assert [s.result.status for s in slots] == [JobStatus.COMPLETED] * 2


def test_wait_is_bounded_by_max_wait_h(tmp_path):
    launcher, slots = _waiter([{"7_0": "PENDING", "7_1": "PENDING"}], tmp_path)
    launcher.max_wait_h = 0.5 / 3600
    t0 = time.time()
    launcher._wait(slots, None)
    assert time.time() - t0 < 5
    assert all(s.result.status == JobStatus.FAILED and isinstance(s.result._return_value, L.WaitTimeoutError)
               for s in slots)


def test_signal_delay_is_cut_below_short_time_limits():
    assert L.SlurmLauncher(timeout_min=2, signal_delay_s=120).params["signal_delay_s"] == 12
    assert L.SlurmLauncher(timeout_min=720, signal_delay_s=90).params["signal_delay_s"] == 90


# ------------------------------------------------------------------ upstream's parts, reused
def test_launchers_are_upstreams_plus_the_wait():
    """The job itself, its requeue and the parameter handling are upstream's, not copies."""
    for ours, theirs in ((L.SlurmLauncher, upstream.SlurmLauncher), (L.LocalLauncher, upstream.LocalLauncher)):
        assert issubclass(ours, theirs)
        assert ours.__call__ is upstream.BaseSubmititLauncher.__call__
        assert ours.checkpoint is upstream.BaseSubmititLauncher.checkpoint
    lc = L.LocalLauncher(submitit_folder="x/%j", array_parallelism=3, poll_s=1, lost_after_s=2, max_wait_h=None,
                         signal_delay_s=90)
    assert lc.array_parallelism == 3 and lc.poll_s == 1.0 and lc.lost_after_s == 2.0 and lc.signal_delay_s == 90
    assert set(lc.params) == {"submitit_folder"}  # the rest is ours, not upstream's


def test_local_submission_is_prepared_not_submitted(tmp_path):
    """The launcher builds the executor as upstream's launch would (signal_delay_s and
    max_num_timeout reach submitit's local executor) and numbers the jobs; nothing starts until
    the launcher submits it."""
    sweep = tmp_path / "sweep"
    lc = L.LocalLauncher(submitit_folder=f"{sweep}/.submitit/%j", timeout_min=60, signal_delay_s=90,
                         max_num_timeout=3, array_parallelism=1, gpus_per_node=0)
    lc.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    slots = [L._Slot(num=n, overrides=[f"seed={n}"]) for n in (4, 5)]
    executor = lc._prepare(slots)
    assert executor.parameters["signal_delay_s"] == 90 and executor.max_num_timeout == 3
    assert [s.args[:3] for s in slots] == [(["seed=4"], "hydra.sweep.dir", 4), (["seed=5"], "hydra.sweep.dir", 5)]
    assert not [p for p in (sweep / ".submitit").iterdir() if p.name != "%j"]  # nothing submitted


def test_presets_compose():
    from conftest import compose

    cfg = compose("hydra/launcher=slurm")
    lc = cfg.hydra.launcher
    assert lc._target_ == "hydra_plugins.peft_vit_launcher.SlurmLauncher"
    assert lc.additional_parameters.requeue is True and lc.max_num_timeout > 0
    assert 0 < lc.signal_delay_s < lc.timeout_min * 60 / 2
    cfg = compose("hydra/launcher=local")
    assert cfg.hydra.launcher._target_ == "hydra_plugins.peft_vit_launcher.LocalLauncher"


def test_skip_done_before_submission(tmp_path):
    """The launcher decides with rundir.skip_done, as the loop does, on the job's config and in
    its dir (hydra.sweep.dir / subdir): same config skipped, another refused with the key that
    differs, skip_done=false or no record submitted."""
    import json

    from conftest import compose
    from hydra.types import HydraContext

    from peft_vit.engine import rundir

    def job_cfg(overrides):  # as Hydra's config loader makes it (compose() also sets it read-only)
        cfg = compose(f"hydra.sweep.dir={tmp_path}", *overrides)
        OmegaConf.set_readonly(cfg.hydra, None)
        return cfg

    lc = L.LocalLauncher(submitit_folder=f"{tmp_path}/.submitit/%j")
    lc.config = compose()
    lc.hydra_context = HydraContext(config_loader=SimpleNamespace(load_sweep_config=lambda _, o: job_cfg(o)),
                                    callbacks=None)  # type: ignore[arg-type]
    done = json.dumps({"config": rundir.result_config(job_cfg(["optim.lr=0.1"]))})
    jobs = [["optim.lr=0.1"], ["optim.lr=0.5"], ["optim.lr=0.1", "skip_done=false"], ["optim.lr=0.2"]]
    for overrides in jobs[:3]:  # a record of the lr=0.1 run in each of the first three job dirs (skip_done
        d = tmp_path / job_cfg(overrides).hydra.job.override_dirname  # is a runtime key: the third is the first's)
        d.mkdir(exist_ok=True)
        (d / "results.json").write_text(done)
    slots = [L._Slot(num=n, overrides=o) for n, o in enumerate(jobs)]
    for s in slots:
        lc._skip_done(s)
    assert slots[0].result.status == JobStatus.COMPLETED
    assert slots[0].result.working_dir == str(tmp_path / "optim.lr=0.1")
    assert slots[1].result.status == JobStatus.FAILED
    assert isinstance(slots[1].result._return_value, rundir.ForeignStateError)
    assert "optim.lr: 0.1 -> 0.5" in str(slots[1].result._return_value)
    assert slots[2].result is None and slots[3].result is None  # to submit: the job composes its config
