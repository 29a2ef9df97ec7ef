"""Sweep launchers: hydra-submitit-launcher's SLURM and local launchers, with a bounded wait.

The stock launchers wait on each job with ``job.results()``. That returns once submitit sees
the job end; without SLURM accounting (sacct) a job that died without writing its result
(scancel, OOM kill, node failure, ``os._exit``) is never seen to end, so the sweep waits
forever; with accounting submitit still looks only every few minutes (up to 10).

These launchers submit the same way, then poll the scheduler themselves (``squeue`` for the
jobs slurmctld holds, ``sacct`` when accounting is on) every ``poll_s`` seconds:

* a job that wrote its result is collected as usual;
* a job the scheduler reports ended (or no longer knows) that has written no result within
  ``lost_after_s`` seconds is reported as died-without-result: its job id, state, overrides
  and the tail of its log, as a failed ``JobReturn`` (Hydra then exits with that error,
  after all other jobs have finished). A poll where neither squeue nor sacct answers is no
  news, never a death;
* ``max_wait_h`` (optional) bounds the whole wait; jobs still running then are left to run
  and reported.

A requeued job (pre-emption, time-out: SIGUSR2, submitit checkpoints and requeues) is
PENDING/RUNNING again, never "ended", so it is waited for.

Re-launching a sweep (same ``hydra.sweep.dir``):

* jobs whose ``results.json`` exists and was made by the same configuration (fingerprint,
  peft_vit/engine/rundir.py) are not submitted at all (``skip_done``; the loop would skip them
  too, after queueing and starting); one made by another configuration (a preset edited since)
  is refused, as the loop would refuse it, with the keys that differ, and not submitted;
* SLURM jobs of an earlier launch still queued or running (its launcher died: logout, Ctrl-C)
  are waited for, not submitted twice (each job's folder holds ``peft_vit_job.json``).

Each job's config is composed at submission and shipped with the job, so a job that starts,
or restarts after a requeue, hours later runs with the config it was submitted with and finds
its checkpoint in the same job dir, whatever happened to ``configs/`` meanwhile (the stock
launcher re-composes from ``configs/`` in the job).

The local launcher also runs at most ``array_parallelism`` jobs at a time (submitit's local
executor starts every job at once, which on one GPU means out-of-memory).

Hydra instantiates launchers only from the ``hydra_plugins`` namespace (a ``_target_``
elsewhere fails with "Invalid plugin ... not the hydra_plugins package"); the classes Hydra
sees are thin subclasses in ``hydra_plugins/peft_vit_launcher.py`` (repo root), which also
registers the config schemas below. ``configs/hydra/launcher/{slurm,local}.yaml`` use them.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocal
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm
from omegaconf import DictConfig, OmegaConf, open_dict

from .rundir import ForeignStateError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

# SLURM job states (squeue %T / sacct State). Anything else means the job has ended.
ALIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD", "STOPPED",
}
WAIT_KEYS = ("poll_s", "lost_after_s", "max_wait_h")


class JobDiedError(RuntimeError):
    """A sweep job ended (or vanished from the scheduler) without writing its result."""


class WaitTimeoutError(RuntimeError):
    """The launcher stopped waiting (max_wait_h) while the job was still queued or running."""


# ------------------------------------------------------------------------------ schemas
@dataclass
class BoundedSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.peft_vit_launcher.SlurmLauncher"
    # seconds between two looks at the scheduler (one squeue + one sacct for the whole sweep)
    poll_s: float = 15.0
    # a job the scheduler reports ended, or no longer lists, with no result after this long
    # is reported as died-without-result
    lost_after_s: float = 120.0
    # stop waiting after this many hours (null: wait as long as jobs are queued or running)
    max_wait_h: Optional[float] = None


@dataclass
class BoundedLocalQueueConf(LocalQueueConf):
    _target_: str = "hydra_plugins.peft_vit_launcher.LocalLauncher"
    # jobs running at once on this machine
    array_parallelism: int = 1
    # SIGUSR2 this long before timeout_min (checkpoint + requeue, as on SLURM)
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    poll_s: float = 2.0
    lost_after_s: float = 30.0
    max_wait_h: Optional[float] = None


def register_configs() -> None:
    """Config schemas `peft_vit_slurm` / `peft_vit_local` in group hydra/launcher."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="peft_vit_slurm", node=BoundedSlurmQueueConf(), provider="peft_vit")
    cs.store(group="hydra/launcher", name="peft_vit_local", node=BoundedLocalQueueConf(), provider="peft_vit")


# ------------------------------------------------------------------------------ helpers
@dataclass
class _Slot:
    """One sweep job: what was asked, and the submitit job running it (None: not yet submitted)."""

    num: int
    overrides: List[str]
    params: Tuple[Any, ...]
    job: Any = None
    gone_since: Optional[float] = None
    state: str = "UNSUBMITTED"
    result: Optional[JobReturn] = None


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _failed(slot: _Slot, err: BaseException) -> JobReturn:
    ret = JobReturn(overrides=list(slot.overrides), status=JobStatus.FAILED, _return_value=err)
    return ret


def _run(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _expand(job_field: str) -> List[str]:
    """'12_3' -> ['12_3']; '12_[0-2,5]' -> ['12_0', '12_1', '12_2', '12_5']; '12' -> ['12']."""
    if "_[" not in job_field:
        return [job_field]
    main, rest = job_field.split("_[", 1)
    rest = rest.rstrip("]").split("%")[0]
    ids = []
    for part in rest.split(","):
        if "-" in part:
            a, b = part.split("-")
            ids += [f"{main}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            ids.append(f"{main}_{part}")
    return ids


def slurm_states(job_ids: Sequence[str]) -> Optional[Dict[str, str]]:
    """State of each job id (``123`` or array task ``123_4``): squeue for jobs slurmctld still
    holds, else sacct when accounting is on. Ids neither knows are absent. None when neither
    command answered (controller down or restarting): no news, not "the job is gone"."""
    mains = sorted({j.split("_")[0] for j in job_ids})
    if not mains:
        return {}
    states: Dict[str, str] = {}
    acct = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(mains)])
    for line in (acct or "").splitlines():
        if "|" in line:
            jid, st = line.split("|", 1)
            for j in _expand(jid.strip()):
                states[j] = st.split()[0] if st.strip() else "UNKNOWN"
    # squeue last: the controller's view is the current one (sacct lags behind it). All of this
    # user's jobs, finished ones too (-t all, kept for MinJobAge); -j with a purged id would fail.
    queue = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-u", str(os.getuid())])
    if queue is None and acct is None:
        return None
    wanted = set(mains)
    for line in (queue or "").splitlines():
        if "|" not in line:
            continue
        jid, st = line.split("|", 1)
        if jid.split("_")[0] in wanted:
            for j in _expand(jid.strip()):
                states[j] = st.strip()
    return states


# ------------------------------------------------------------------------------ launchers
class _BoundedWait:
    """Mixin over hydra-submitit-launcher's BaseSubmititLauncher: submit, then poll."""

    _EXECUTOR: str

    def __init__(self, **params: Any) -> None:
        wait = {k: params.pop(k) for k in WAIT_KEYS if k in params}
        self.poll_s = float(wait.get("poll_s") or 10.0)
        self.lost_after_s = float(wait.get("lost_after_s") if wait.get("lost_after_s") is not None else 120.0)
        mw = wait.get("max_wait_h")
        self.max_wait_h = None if mw is None else float(mw)
        super().__init__(**params)  # type: ignore[call-arg]

    # -- executor, as BaseSubmititLauncher.launch builds it
    def _executor(self) -> Any:
        import submitit

        params = dict(self.params)  # type: ignore[attr-defined]
        init_params = {"folder": params["submitit_folder"]}
        specific_init_keys = {"max_num_timeout"}
        init_params.update(**{f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x in specific_init_keys})
        init_keys = specific_init_keys | {"submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        params = {x if x in baseparams else f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x not in init_keys}
        executor.update_parameters(**params)
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None  # type: ignore[attr-defined]
        config = self.config  # type: ignore[attr-defined]
        assert len(job_overrides) > 0
        # jobs import peft_vit (and hydra_plugins.peft_vit_launcher, to unpickle this launcher)
        # wherever they start: put the repo on their path
        pp = os.environ.get("PYTHONPATH", "")
        if str(REPO_ROOT) not in pp.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([pp] if pp else []))
        executor = self._executor()
        sweep_dir = Path(str(config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
        slots, done = [], []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            # the job's config, composed now: a job that starts (or restarts after a requeue)
            # later runs with it, not with whatever configs/ holds by then
            job_cfg = self._compose(list(overrides))
            params = (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state(), job_cfg)
            slot = _Slot(num=idx, overrides=list(overrides), params=params)
            slots.append(slot)
            try:
                finished = self._finished_result(slot, job_cfg)
            except ForeignStateError as e:  # as the job itself would fail: never submitted
                slot.result = _failed(slot, e)
                done.append(slot)
                log.error(f"\t#{idx} : {' '.join(filter_overrides(overrides))}  [refused: {e}]")
                continue
            if finished is not None:
                # skip_done, before submission: nothing is queued for a job that has its results
                slot.result = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                        working_dir=str(finished.parent), task_name=str(config.hydra.job.name))
                done.append(slot)
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}  [skip: {finished} exists]")
            else:
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        if done:
            log.info(f"skip_done: {len(done)} of {len(slots)} jobs already have results")
        self._adopt(slots)
        if len(done) < len(slots):
            self._wait(executor, slots)
        failed = [s for s in slots if s.result is None or s.result.status != JobStatus.COMPLETED]
        if not failed:
            log.info(f"all {len(slots)} jobs completed")
        else:
            log.error(f"{len(slots) - len(failed)} of {len(slots)} jobs completed; {len(failed)} did not:")
            for s in failed:
                err = s.result._return_value if s.result is not None else "no result"
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                first = first if len(first) <= 240 else first[:237] + "..."
                log.error(f"\t#{s.num} ({' '.join(filter_overrides(s.overrides))}): {first}")
        return [s.result for s in slots]  # type: ignore[misc]

    def _compose(self, overrides: List[str]) -> Optional[DictConfig]:
        try:
            return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)  # type: ignore
        except Exception as e:  # noqa: BLE001 - let the job compose it (and report the error) as Hydra does
            log.debug(f"composing {overrides} in the launcher failed: {e}")
            return None

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Singleton], sweep_config: Optional[DictConfig] = None) -> JobReturn:
        """In the job: as BaseSubmititLauncher.__call__, but with the config composed at submission
        (so a requeued job finds its checkpoint in the same job dir even if configs/ changed)."""
        if sweep_config is None:
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)  # type: ignore
        import submitit
        from hydra.core.utils import run_job, setup_globals

        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = copy.deepcopy(sweep_config)
        with open_dict(sweep_config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            job.num = job_num
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function,  # type: ignore
                       config=sweep_config, job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")

    def _finished_result(self, slot: _Slot, cfg: Optional[DictConfig]) -> Optional[Path]:
        """<job dir>/results.json when the job's config has skip_done and the file exists and was
        made by the same configuration (as the loop's skip_done decides: a record of another
        configuration raises ForeignStateError naming the keys that differ). The job dir is
        computed as Hydra's run_job does (sweep.dir / sweep.subdir); a subdir that depends on
        hydra.job.id (known only inside the job) is never skipped here."""
        from hydra.core.hydra_config import HydraConfig

        from ..record import RESULTS
        from .rundir import finished_record, result_config

        if cfg is None or not cfg.get("skip_done", False):
            return None
        hc = HydraConfig.instance()
        old = hc.cfg
        try:
            cfg = copy.deepcopy(cfg)
            raw_subdir = str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir", ""))
            if "job.id" in raw_subdir:
                return None
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = slot.num
            hc.set_config(cfg)
            job_dir = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
            path = job_dir / RESULTS
            if not path.is_file():
                return None
            finished_record(path, result_config(cfg))  # raises if the record is foreign or unreadable
            return path
        except ForeignStateError:
            raise
        except Exception as e:  # noqa: BLE001 - never fail a sweep over this shortcut; the job skips itself
            log.debug(f"skip_done check failed for #{slot.num}: {e}")
            return None
        finally:
            hc.cfg = old

    # -- jobs of an earlier launch of this sweep that are still queued or running
    def _adopt(self, slots: List[_Slot]) -> None:
        """Give ``slots`` whose job an earlier launch of this sweep left queued or running that job,
        so it is waited for, not submitted twice. Here: none (local jobs end with their launcher)."""

    # -- waiting
    def _submit(self, executor: Any, slots: List[_Slot]) -> None:
        raise NotImplementedError

    def _states(self, slots: List[_Slot]) -> Optional[Dict[str, str]]:
        """job id -> scheduler state; None: the scheduler did not answer this time."""
        raise NotImplementedError

    def _collect(self, slot: _Slot) -> None:
        job = slot.job
        try:
            slot.result = job.results()[0]
        except Exception as e:  # noqa: BLE001 - submitit's UncompletedJobError / FailedJobError, unpickling
            slot.result = _failed(slot, JobDiedError(
                f"{self._EXECUTOR} job {job.job_id} (sweep job #{slot.num}) failed outside the task: {e}"))

    def _died(self, slot: _Slot) -> None:
        job = slot.job
        msg = (f"{self._EXECUTOR} job {job.job_id} (sweep job #{slot.num}) ended without writing a result "
               f"(scheduler state: {slot.state}; no result {self.lost_after_s:.0f} s later): killed (scancel, "
               f"out of memory, node failure) or crashed hard.\n"
               f"overrides: {' '.join(filter_overrides(slot.overrides))}\n"
               f"logs: {job.paths.stderr}\n      {job.paths.stdout}")
        tail = _tail(job.paths.stderr) or _tail(job.paths.stdout)
        if tail:
            msg += "\n--- end of its log ---\n" + tail
        log.error(msg)
        slot.result = _failed(slot, JobDiedError(msg))

    def _wait(self, executor: Any, slots: List[_Slot]) -> None:
        start = time.time()
        deadline = None if self.max_wait_h is None else start + self.max_wait_h * 3600
        while True:
            self._submit(executor, slots)
            live = [s for s in slots if s.job is not None and s.result is None]
            if not live and all(s.result is not None for s in slots):
                return
            states = self._states(live)
            now = time.time()
            for s in live:
                if s.job.paths.result_pickle.exists():
                    self._collect(s)
                    continue
                if states is None:  # no answer from the scheduler: no news (a job is declared
                    continue        # dead only on a poll where the scheduler answered)
                st = states.get(str(s.job.job_id))
                s.state = st or "not known to the scheduler"
                if st is not None and st.upper() in ALIVE_STATES:
                    s.gone_since = None
                    continue
                if s.gone_since is None:
                    s.gone_since = now
                elif now - s.gone_since >= self.lost_after_s:
                    self._died(s)
            if deadline is not None and now > deadline and any(s.result is None for s in slots):
                for s in slots:
                    if s.result is None:
                        where = f"id {s.job.job_id}, state {s.state}" if s.job is not None else "never submitted"
                        s.result = _failed(s, WaitTimeoutError(
                            f"sweep job #{s.num} still not done after max_wait_h={self.max_wait_h} ({where}); "
                            f"it was left running: re-launch the same sweep (same hydra.sweep.dir) later to "
                            f"collect it (jobs with a results.json are skipped)\n"
                            f"overrides: {' '.join(filter_overrides(s.overrides))}"))
                return
            if any(s.result is None for s in slots):
                time.sleep(self.poll_s)


class SlurmLauncher(_BoundedWait, _SubmititSlurm):
    """SLURM job array (``array_parallelism`` at a time), bounded wait.

    ``signal_delay_s`` is the head start SIGUSR2 gets before the time limit (submitit then
    calls checkpoint() and requeues); if it is not below half the time limit the signal
    would come at start, so it is cut to a tenth of the limit, with a warning."""

    _EXECUTOR = "slurm"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        limit_s = float(self.params.get("timeout_min") or 0) * 60
        delay = self.params.get("signal_delay_s")
        if limit_s > 0 and delay is not None and 2 * float(delay) >= limit_s:
            new = max(5, int(limit_s / 10))
            log.warning(f"signal_delay_s={delay} is not below half of timeout_min={self.params['timeout_min']}: "
                        f"SIGUSR2 would come at the start; using signal_delay_s={new}")
            self.params["signal_delay_s"] = new

    def _executor(self) -> Any:
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise RuntimeError("hydra/launcher=slurm: sbatch/srun not found, this is not a SLURM login node. On one "
                               "machine use hydra/launcher=local; for a local test cluster run "
                               "scripts/slurm_local.sh start (root, Debian/Ubuntu)")
        return super()._executor()

    def _submit(self, executor: Any, slots: List[_Slot]) -> None:
        todo = [s for s in slots if s.job is None and s.result is None]
        if not todo:
            return
        jobs = executor.map_array(self, *zip(*[s.params for s in todo]))
        for s, j in zip(todo, jobs):
            s.job = j
            self._record(s)
        if len(jobs) == 1:  # submitit sends a single job as a plain job, not an array
            log.info(f"submitted job {jobs[0].job_id}")
        else:
            log.info(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks)")

    def _states(self, slots: List[_Slot]) -> Optional[Dict[str, str]]:
        return slurm_states([str(s.job.job_id) for s in slots])

    SIDECAR = "peft_vit_job.json"

    def _record(self, slot: _Slot) -> None:
        """Next to submitit's files of the job: which sweep job it runs (read by _adopt)."""
        try:
            folder = Path(slot.job.paths.folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.SIDECAR).write_text(json.dumps({"num": slot.num, "overrides": slot.overrides}))
        except OSError as e:
            log.warning(f"could not record job {slot.job.job_id}: {e}")

    def _adopt(self, slots: List[_Slot]) -> None:
        """A sweep re-launched while jobs of an earlier launch (whose launcher died: logout, Ctrl-C)
        are still queued or running waits for those jobs instead of submitting duplicates."""
        import submitit

        folder_pattern = str(self.params["submitit_folder"])  # type: ignore[attr-defined]
        root = Path(folder_pattern.split("%j")[0])
        if "%j" not in folder_pattern or not root.is_dir():
            return
        earlier = {}
        for side in root.glob(f"*/{self.SIDECAR}"):
            try:
                earlier[side.parent.name] = json.loads(side.read_text())
            except (OSError, ValueError):
                continue
        if not earlier:
            return
        states = slurm_states(list(earlier)) or {}
        todo = {tuple(s.overrides): s for s in slots if s.result is None and s.job is None}
        for job_id, rec in sorted(earlier.items()):
            slot = todo.get(tuple(rec.get("overrides", [])))
            if slot is None or states.get(job_id, "").upper() not in ALIVE_STATES:
                continue
            slot.job = submitit.SlurmJob(folder=folder_pattern, job_id=job_id)
            del todo[tuple(slot.overrides)]
            log.info(f"\t#{slot.num} : already {states[job_id]} as slurm job {job_id} (an earlier launch of "
                     f"this sweep); waiting for it instead of submitting it again")


class LocalLauncher(_BoundedWait, _SubmititLocal):
    """One process per job on this machine, at most ``array_parallelism`` at once, bounded wait."""

    _EXECUTOR = "local"

    def _executor(self) -> Any:
        # submitit's AutoExecutor passes only generic parameters to the local executor; build it
        # directly so that signal_delay_s (and max_num_timeout) reach it
        import submitit

        p = self.params  # type: ignore[attr-defined]
        executor = submitit.LocalExecutor(folder=p["submitit_folder"], max_num_timeout=int(p.get("max_num_timeout", 3)))
        executor.update_parameters(
            timeout_min=p.get("timeout_min") or 60, gpus_per_node=p.get("gpus_per_node") or 0,
            tasks_per_node=p.get("tasks_per_node") or 1, signal_delay_s=int(p.get("signal_delay_s") or 90),
            stderr_to_stdout=bool(p.get("stderr_to_stdout")), name=p.get("name"))
        return executor

    def _submit(self, executor: Any, slots: List[_Slot]) -> None:
        limit = max(1, int(self.params.get("array_parallelism") or 1))  # type: ignore[attr-defined]
        running = sum(1 for s in slots if s.job is not None and s.result is None)
        for s in slots:
            if running >= limit:
                break
            if s.job is None and s.result is None:
                s.job = executor.submit(self, *s.params)
                running += 1

    def _states(self, slots: List[_Slot]) -> Dict[str, str]:
        out = {}
        for s in slots:
            st = s.job.state
            out[str(s.job.job_id)] = "RUNNING" if st == "RUNNING" else st
        return out


# BaseSubmititLauncher.launch is replaced by _BoundedWait.launch through the MRO
assert SlurmLauncher.launch is _BoundedWait.launch and issubclass(SlurmLauncher, BaseSubmititLauncher)
