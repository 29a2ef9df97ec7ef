"""peft_vit's sweep launchers (configs/hydra/launcher/{slurm,local}.yaml; docs/DESIGN.md, "Launchers"):
hydra-submitit-launcher's, with its parameters, job (``__call__``) and requeue (``checkpoint``), plus
skip_done before submission (``rundir.skip_done``, the loop's own decision) and a bounded wait instead of
``job.results()`` (``poll_s``, ``lost_after_s``, ``max_wait_h``: see judge). Upstream's ``launch`` submits
and waits in one call, so the sweep dir, the job numbering and the executor it builds are built here the
same way, with submitit's public API (``AutoExecutor``/``LocalExecutor``, ``update_parameters``,
``submit``, ``batch``)."""

import dataclasses
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as upstream
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from omegaconf import OmegaConf, open_dict

from peft_vit.engine.rundir import ForeignStateError, skip_done

log = logging.getLogger(__name__)
# SLURM job states (squeue %T) of a job that is queued or running; any other has ended
ALIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD", "STOPPED"})


class JobDiedError(RuntimeError):
    """A sweep job ended (or vanished from the scheduler) without writing its result."""


class WaitTimeoutError(RuntimeError):
    """The launcher stopped waiting (max_wait_h) while the job was still queued or running."""


@dataclasses.dataclass
class _WaitConf:
    poll_s: float = 15.0  # seconds between two looks at the scheduler
    lost_after_s: float = 120.0  # ended or unknown without a result this long: died
    max_wait_h: Optional[float] = None  # stop waiting after this many hours (null: never)


@dataclasses.dataclass
class BoundedSlurmQueueConf(_WaitConf, SlurmQueueConf):
    _target_: str = "hydra_plugins.peft_vit_launcher.SlurmLauncher"


@dataclasses.dataclass
class BoundedLocalQueueConf(_WaitConf, LocalQueueConf):
    _target_: str = "hydra_plugins.peft_vit_launcher.LocalLauncher"
    array_parallelism: int = 1  # jobs running at once on this machine
    signal_delay_s: int = 90  # SIGUSR2 this long before timeout_min (checkpoint + requeue)
    max_num_timeout: int = 3


for _name, _node in (("peft_vit_slurm", BoundedSlurmQueueConf), ("peft_vit_local", BoundedLocalQueueConf)):
    ConfigStore.instance().store(group="hydra/launcher", name=_name, node=_node, provider="peft_vit")


# ---------------------------------------------------- pure logic (tests/test_launcher_logic.py)
def parse_states(squeue: str) -> Dict[str, str]:
    """Job id (``12``, array task ``12_3``) -> state, from ``squeue -h -r -o %i|%T`` output."""
    return dict(line.strip().partition("|")[::2] for line in squeue.splitlines() if "|" in line)


def judge(has_result: bool, answered: bool, state: Optional[str], gone_since: Optional[float], now: float,
          lost_after_s: float) -> Tuple[str, Optional[float]]:
    """One look at a job: ('done' | 'alive' | 'lost', since when the scheduler has shown it ended).
    Its result decides first; a poll without an answer is no news; a job queued or running is alive;
    one ended or unknown is lost once that lasted lost_after_s."""
    if has_result:
        return "done", gone_since
    if not answered:
        return "alive", gone_since
    if state in ALIVE_STATES:
        return "alive", None
    if gone_since is None:
        return "alive", now
    return ("lost" if now - gone_since >= lost_after_s else "alive"), gone_since


def job_outcome(job_dir: Optional[str]) -> str:
    """A finished job's line: its accuracy (the record's test_acc or val_acc) and its record's path."""
    import json

    path = Path(job_dir or ".") / "results.json"
    try:
        rec = json.loads(path.read_text())
        key = "test_acc" if "test_acc" in rec else "val_acc"
        return f"{key} {rec[key]:.2f}% -> {path}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"done, no readable record at {path}"


# ---------------------------------------------------- launchers
@dataclasses.dataclass
class _Slot:
    """One sweep job; ``args``: upstream's arguments of its ``__call__``."""
    num: int
    overrides: List[str]
    args: Tuple[Any, ...] = ()
    job: Any = None
    state: str = "UNSUBMITTED"
    gone_since: Optional[float] = None
    result: Optional[JobReturn] = None

    def fail(self, err: BaseException) -> None:
        self.result = JobReturn(overrides=list(self.overrides), status=JobStatus.FAILED, _return_value=err)

    def __str__(self) -> str:
        return f"#{self.num} : {' '.join(filter_overrides(self.overrides))}"


class _Bounded:
    """Mixin over upstream's launchers: skip_done, upstream's submission, then the bounded wait.
    Subclasses define _executor (submitit's, for upstream's parameters), _submit (what may start now) and
    _states (job id -> state; None: no answer)."""

    def __init__(self, poll_s: float = 15.0, lost_after_s: float = 120.0, max_wait_h: Optional[float] = None,
                 **params: Any) -> None:
        self.poll_s, self.lost_after_s, self.max_wait_h = poll_s, lost_after_s, max_wait_h
        super().__init__(**params)  # type: ignore[call-arg]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        slots = [_Slot(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for s in slots:
            self._skip_done(s)
        self._wait(slots, self._prepare(slots) if any(s.result is None for s in slots) else None)
        failed = [s for s in slots if s.result.status != JobStatus.COMPLETED]  # type: ignore[union-attr]
        for s in slots:
            if s not in failed:
                hc = s.result.hydra_cfg  # type: ignore[union-attr]  # a job's; None for a skipped one
                job_dir = OmegaConf.select(hc, "hydra.runtime.output_dir") if hc else s.result.working_dir  # type: ignore
                log.info(f"\t{s}: {job_outcome(job_dir)}")
        try:  # submitit's folder template, made once with its %j unfilled and left empty
            (Path(str(self.config.hydra.sweep.dir)) / ".submitit" / "%j").rmdir()  # type: ignore[attr-defined]
        except OSError:
            pass
        log.log(logging.ERROR if failed else logging.INFO, f"{len(slots) - len(failed)} of {len(slots)} jobs completed"
                + "".join(f"\n\t{s}: {(str(s.result._return_value).splitlines() or ['?'])[0][:240]}" for s in failed))
        return [s.result for s in slots]  # type: ignore[misc]

    def _skip_done(self, slot: _Slot) -> None:
        """skip_done on the job's config as upstream composes it; sets ``slot.result`` of a job not to
        submit: done, or refused (another config's record: the job itself would fail)."""
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, slot.overrides)  # type: ignore
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = slot.num
            HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves from it, as in the job
            job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            if skip_done(cfg, job_dir) is not None:
                slot.result = JobReturn(overrides=list(slot.overrides), status=JobStatus.COMPLETED,
                                        working_dir=str(job_dir), task_name=str(cfg.hydra.job.name))
                log.info(f"\t{slot}  [skip: {job_dir / 'results.json'} exists]")
        except ForeignStateError as e:
            slot.fail(e)
            log.error(f"\t{slot}  [refused: {e}]")
        except Exception as e:  # noqa: BLE001 - e.g. a job dir named by hydra.job.id: the job decides itself
            log.debug(f"checking skip_done of {slot} in the launcher failed: {e}")

    def _prepare(self, slots: List[_Slot]) -> Any:
        """What upstream's ``launch`` does before it submits: the sweep dir (and its mode), each job's
        numbered line in the log and its arguments of upstream's ``__call__`` (``slot.args``), and the
        executor (:meth:`_executor`), which this returns. Nothing is submitted."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # type: ignore[attr-defined]
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")  # type: ignore[attr-defined]
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:  # type: ignore[attr-defined]
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))  # type: ignore[attr-defined]
        for s in slots:
            log.info(f"\t{s}")
            s.args = (list(s.overrides), "hydra.sweep.dir", s.num, f"job_id_for_{s.num}", Singleton.get_state())
        return self._executor()

    def _wait(self, slots: List[_Slot], executor: Any) -> None:
        deadline = None if self.max_wait_h is None else time.time() + self.max_wait_h * 3600
        while True:
            self._submit(slots, executor)
            live = [s for s in slots if s.job is not None and s.result is None]
            if not live:  # _submit starts a job whenever none is running
                return
            states, now = self._states(live), time.time()
            for s in live:
                if states is not None:
                    s.state = states.get(str(s.job.job_id)) or "not known to the scheduler"
                verdict, s.gone_since = judge(s.job.paths.result_pickle.exists(), states is not None, s.state,
                                              s.gone_since, now, self.lost_after_s)
                if verdict == "done":
                    try:
                        s.result = s.job.results()[0]
                    except Exception as e:  # noqa: BLE001 - submitit's UncompletedJobError / FailedJobError
                        s.fail(JobDiedError(f"job {s.job.job_id} (sweep job {s}) failed outside the task: {e}"))
                elif verdict == "lost":
                    s.fail(self._died(s))
            if deadline is not None and now > deadline:
                for s in (s for s in slots if s.result is None):
                    s.fail(WaitTimeoutError(f"sweep job {s} (job {getattr(s.job, 'job_id', None)}, {s.state}) not done "
                                            f"after max_wait_h={self.max_wait_h}; left running: re-launch the same "
                                            f"sweep (same hydra.sweep.dir) later to collect it"))
            if any(s.result is None for s in slots):
                time.sleep(self.poll_s)

    def _died(self, slot: _Slot) -> JobDiedError:
        paths = slot.job.paths
        logs = [Path(p) for p in (paths.stderr, paths.stdout) if Path(p).is_file()]
        tail = next((t for t in ("\n".join(p.read_text(errors="replace").splitlines()[-25:]) for p in logs) if t), "")
        msg = (f"{self._EXECUTOR} job {slot.job.job_id} (sweep job {slot}) ended without writing a "  # type: ignore
               f"result (scheduler state: {slot.state}; no result {self.lost_after_s:.0f} s later): killed (scancel, "
               f"out of memory, node failure) or crashed hard.\nlogs: {paths.stderr}\n      {paths.stdout}"
               + (f"\n--- end of its log ---\n{tail}" if tail else ""))
        log.error(msg)
        return JobDiedError(msg)


class SlurmLauncher(_Bounded, upstream.SlurmLauncher):
    """A SLURM job array per sweep (``array_parallelism`` at a time). ``signal_delay_s`` (SIGUSR2
    before the time limit) not below half the limit would come at the start: cut to a tenth."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        limit_s, delay = float(self.params.get("timeout_min") or 0) * 60, self.params.get("signal_delay_s")
        if limit_s > 0 and delay is not None and 2 * float(delay) >= limit_s:
            self.params["signal_delay_s"] = max(5, int(limit_s / 10))
            log.warning(f"signal_delay_s={delay} is not below half of timeout_min={self.params['timeout_min']}: "
                        f"SIGUSR2 would come at the start; using signal_delay_s={self.params['signal_delay_s']}")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise RuntimeError("hydra/launcher=slurm: sbatch/srun not found (not a SLURM login node). On one machine "
                               "use hydra/launcher=local; a local test cluster: scripts/slurm_local.sh start")
        return super().launch(job_overrides, initial_job_idx)

    def _executor(self) -> Any:
        """submitit's AutoExecutor for SLURM with upstream's parameters: the shared ones as they are,
        the others prefixed ``slurm_`` (``max_num_timeout`` when it is built)."""
        import submitit

        params = dict(self.params)
        folder, init = params.pop("submitit_folder"), {}
        if "max_num_timeout" in params:
            init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def _submit(self, slots: List[_Slot], executor: Any) -> None:
        todo = self._adopt([s for s in slots if s.job is None and s.result is None])
        if todo:  # once: one job array
            with executor.batch():
                jobs = [executor.submit(self, *s.args) for s in todo]
            for s, job in zip(todo, jobs):
                s.job = job
            log.info(f"submitted slurm job {jobs[0].job_id.split('_')[0]} ({len(jobs)} sweep jobs)")

    def _states(self, slots: Sequence[_Slot] = ()) -> Optional[Dict[str, str]]:
        """State of each job of this user, ended ones too while squeue keeps them (``-j`` would fail on
        an id the controller purged); None when squeue gives no answer."""
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-u", str(os.getuid())],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return parse_states(out.stdout) if out.returncode == 0 else None

    def _adopt(self, todo: List[_Slot]) -> List[_Slot]:
        """Live jobs of an earlier launch of this sweep (their submission pickled in submitit_folder) take
        the slots of their overrides; returns the rest."""
        import submitit

        folder = self.params["submitit_folder"]
        states = (self._states() or {}) if todo else {}
        by_overrides = {tuple(s.overrides): s for s in todo}
        for job_id in sorted(j for j, st in states.items() if st in ALIVE_STATES):
            pickled = submitit.core.utils.JobPaths(folder, job_id).submitted_pickle
            try:
                slot = by_overrides.pop(tuple(submitit.helpers.DelayedSubmission.load(pickled).args[0]), None)
            except Exception:  # noqa: BLE001 - none (another sweep's job) or unreadable: not ours to adopt
                continue
            if slot is not None:
                slot.job = submitit.SlurmJob(folder=folder, job_id=job_id)
                log.info(f"\t{slot}  [already {states[job_id]} as slurm job {job_id} (an earlier launch of this "
                         f"sweep): waiting for it]")
        return [s for s in todo if s.job is None]


class LocalLauncher(_Bounded, upstream.LocalLauncher):
    """One process per job on this machine, at most ``array_parallelism`` at once."""

    def __init__(self, array_parallelism: int = 1, signal_delay_s: int = 90, **params: Any) -> None:
        self.array_parallelism, self.signal_delay_s = max(1, int(array_parallelism or 1)), int(signal_delay_s)
        super().__init__(**params)

    def _executor(self) -> Any:
        """submitit's LocalExecutor with upstream's parameters (None: not set) and ``signal_delay_s``
        (which submitit's AutoExecutor does not pass to the local executor)."""
        import submitit

        params = {k: v for k, v in self.params.items() if v is not None}
        executor = submitit.LocalExecutor(folder=params.pop("submitit_folder"),
                                          max_num_timeout=params.pop("max_num_timeout", 3))
        executor.update_parameters(**params, signal_delay_s=self.signal_delay_s)
        return executor

    def _submit(self, slots: List[_Slot], executor: Any) -> None:
        free = self.array_parallelism - sum(s.job is not None and s.result is None for s in slots)
        for s in [s for s in slots if s.job is None and s.result is None][:max(0, free)]:
            s.job = executor.submit(self, *s.args)

    def _states(self, slots: List[_Slot]) -> Dict[str, str]:
        return {str(s.job.job_id): s.job.state for s in slots}
