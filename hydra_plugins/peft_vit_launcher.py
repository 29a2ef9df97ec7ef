"""peft_vit's sweep launchers (configs/hydra/launcher/{slurm,local}.yaml): hydra-submitit-launcher's
SlurmLauncher and LocalLauncher, whose parameters, executor, numbering, job (``__call__``) and
requeue (``checkpoint``) they keep, plus what they lack (docs/DESIGN.md, "Launchers"):

* skip_done before submission (``rundir.skip_done``, the loop's decision) on each job's config as
  upstream composes it; the job then runs with that config, also when requeued hours later.
* A bounded wait instead of ``job.results()``: the scheduler is polled every ``poll_s``; a job
  ended or unknown with no result ``lost_after_s`` later fails (JobDiedError); a poll without an
  answer is no news; ``max_wait_h`` bounds it all. SLURM: live jobs of an earlier launch are
  waited for, not resubmitted. Local: ``array_parallelism`` jobs at a time.
"""

import copy
import dataclasses
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple
from unittest import mock

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as upstream
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)
# SLURM job states (squeue %T, sacct State) of a job that is queued or running; any other has ended
ALIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD", "STOPPED"})


class JobDiedError(RuntimeError):
    """A sweep job ended (or vanished from the scheduler) without writing its result."""


class WaitTimeoutError(RuntimeError):
    """The launcher stopped waiting (max_wait_h) while the job was still queued or running."""


@dataclasses.dataclass
class BoundedSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.peft_vit_launcher.SlurmLauncher"
    poll_s: float = 15.0  # seconds between two looks at the scheduler (one squeue + one sacct)
    lost_after_s: float = 120.0  # ended or unknown with no result this long: died without a result
    max_wait_h: Optional[float] = None  # stop waiting after this many hours (null: never)


@dataclasses.dataclass
class BoundedLocalQueueConf(LocalQueueConf):
    _target_: str = "hydra_plugins.peft_vit_launcher.LocalLauncher"
    array_parallelism: int = 1  # jobs running at once on this machine
    signal_delay_s: int = 90  # SIGUSR2 this long before timeout_min (checkpoint + requeue)
    max_num_timeout: int = 3
    poll_s: float = 2.0
    lost_after_s: float = 30.0
    max_wait_h: Optional[float] = None


for _name, _node in (("peft_vit_slurm", BoundedSlurmQueueConf), ("peft_vit_local", BoundedLocalQueueConf)):
    ConfigStore.instance().store(group="hydra/launcher", name=_name, node=_node, provider="peft_vit")


# ---------------------------------------------------- pure logic (tests/test_launcher_logic.py)
def expand(job_field: str) -> List[str]:
    """'12_3' -> ['12_3']; '12_[0-2,5%2]' -> ['12_0', '12_1', '12_2', '12_5']; '12' -> ['12']."""
    if "_[" not in job_field:
        return [job_field]
    main, rest = job_field.split("_[", 1)
    ids = []
    for part in rest.rstrip("]").split("%")[0].split(","):
        a, _, b = part.partition("-")
        ids += [f"{main}_{i}" for i in range(int(a), int(b or a) + 1)] if a else []
    return ids


def parse_states(sacct: Optional[str], squeue: Optional[str], mains: Sequence[str]) -> Optional[Dict[str, str]]:
    """Job id -> state from ``sacct -n -P -X -o JobID,State`` and ``squeue -h -r -o %i|%T`` output
    (None: the command failed); squeue wins, sacct lags behind the controller. Jobs of other
    arrays are left out, so are ids neither knows. None when neither answered: no news."""
    if sacct is None and squeue is None:
        return None
    states: Dict[str, str] = {}
    for text, first_word in ((sacct, True), (squeue, False)):
        for line in (text or "").splitlines():
            jid, sep, st = line.strip().partition("|")
            if sep and jid.split("_")[0] in mains:
                state = (st.split() or ["UNKNOWN"])[0] if first_word else st.strip()  # "CANCELLED by 0"
                states.update({j: state for j in expand(jid)})
    return states


def judge(has_result: bool, answered: bool, state: Optional[str], gone_since: Optional[float], now: float,
          lost_after_s: float) -> Tuple[str, Optional[float]]:
    """One look at a job: ('done' | 'alive' | 'lost', since when the scheduler has shown it ended).
    Its result decides first; a poll without an answer (``answered`` False) is no news; a job
    queued or running is alive; one ended or unknown is lost once that lasted lost_after_s."""
    if has_result:
        return "done", gone_since
    if not answered:
        return "alive", gone_since
    if state is not None and state.split()[0].upper() in ALIVE_STATES:
        return "alive", None
    if gone_since is None:
        return "alive", now
    return ("lost" if now - gone_since >= lost_after_s else "alive"), gone_since


def slurm_states(job_ids: Sequence[str]) -> Optional[Dict[str, str]]:
    """State of each job (``123`` or array task ``123_4``); see parse_states. squeue asks for all of
    this user's jobs, ended ones too (``-j`` with an id the controller purged would fail)."""
    def run(*cmd: str) -> Optional[str]:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    mains = sorted({j.split("_")[0] for j in job_ids})
    return parse_states(run("sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(mains)),
                        run("squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-u", str(os.getuid())),
                        mains) if mains else {}


# ---------------------------------------------------- launchers
@dataclasses.dataclass
class _Slot:
    """One sweep job; params: upstream's submission of it (executor, launcher copy, arguments)."""
    num: int
    overrides: List[str]
    params: Any = None
    job: Any = None
    state: str = "UNSUBMITTED"
    gone_since: Optional[float] = None
    result: Optional[JobReturn] = None

    def fail(self, err: BaseException) -> None:
        self.result = JobReturn(overrides=list(self.overrides), status=JobStatus.FAILED, _return_value=err)

    def __str__(self) -> str:
        return f"#{self.num} : {' '.join(filter_overrides(self.overrides))}"


@dataclasses.dataclass
class _Composed:
    """A job's config loader: its config as composed at submission; the rest is Hydra's loader."""
    loader: Any
    config: Any

    def load_sweep_config(self, master_config: Any, sweep_overrides: List[str]) -> Any:
        return copy.deepcopy(self.config)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "config"):  # not set yet while unpickling
            raise AttributeError(name)
        return getattr(self.loader, name)


class _Bounded:
    """Mixin over upstream's launchers: skip_done, upstream's submission, then the bounded wait.
    Subclasses define _submit (what may start now) and _states (job id -> state; None: no answer)."""
    _EXECUTOR: str

    def __init__(self, poll_s: float = 10.0, lost_after_s: float = 120.0, max_wait_h: Optional[float] = None,
                 **params: Any) -> None:
        self.poll_s, self.lost_after_s = float(poll_s), float(lost_after_s)
        self.max_wait_h = None if max_wait_h is None else float(max_wait_h)
        super().__init__(**params)  # type: ignore[call-arg]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        slots = [_Slot(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        configs = {s.num: self._skip_done(s) for s in slots}
        skipped = sum(s.result is not None and s.result.status == JobStatus.COMPLETED for s in slots)
        if skipped:
            log.info(f"skip_done: {skipped} of {len(slots)} jobs already have results")
        self._adopt(slots)
        if any(s.result is None and s.job is None for s in slots):
            self._upstream_submission(slots, configs)
        self._wait(slots)
        failed = [s for s in slots if s.result.status != JobStatus.COMPLETED]  # type: ignore[union-attr]
        if failed:
            log.error(f"{len(slots) - len(failed)} of {len(slots)} jobs completed; {len(failed)} did not:\n" + "\n".join(
                f"\t{s}: {(str(s.result._return_value).splitlines() or ['?'])[0][:240]}" for s in failed))
        else:
            log.info(f"all {len(slots)} jobs completed")
        return [s.result for s in slots]  # type: ignore[misc]

    def _skip_done(self, slot: _Slot) -> Any:
        """skip_done before submission, on the job's config as upstream composes it (returned, so
        that the job carries it); sets ``slot.result`` for a job that is not to be submitted."""
        from hydra.core.hydra_config import HydraConfig

        from peft_vit.engine.rundir import ForeignStateError, skip_done

        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, slot.overrides)  # type: ignore
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = slot.num
            if "job.id" in str(OmegaConf.to_container(cfg.hydra.sweep).get("subdir")):
                return cfg  # the job dir is known only inside the job
            # ${hydra:...} resolves from the job's config, set as Hydra's own in-process launcher
            # sets it (set_config marks its hydra node read-only: a copy, the job gets cfg)
            job = copy.deepcopy(cfg)
            HydraConfig.instance().set_config(job)
            job_dir = Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)
            record = skip_done(job, job_dir)
        except ForeignStateError as e:  # as the job itself would fail: never submitted
            slot.fail(e)
            log.error(f"\t{slot}  [refused: {e}]")
            return None
        except Exception as e:  # noqa: BLE001 - the job composes it again and reports the error
            log.debug(f"checking skip_done of {slot} in the launcher failed: {e}")
            return None
        if record is not None:
            slot.result = JobReturn(overrides=list(slot.overrides), status=JobStatus.COMPLETED,
                                    working_dir=str(job_dir), task_name=str(self.config.hydra.job.name))  # type: ignore
            log.info(f"\t{slot}  [skip: {job_dir / 'results.json'} exists]")
        return cfg

    def _upstream_submission(self, slots: List[_Slot], configs: Dict[int, Any]) -> None:
        """Upstream's launch for all ``slots``, its executor recording each job (``slot.params``)
        instead of submitting it; each job gets a copy of this launcher with its composed config."""
        import submitit

        recorded: List[Tuple[Any, Tuple[Any, ...]]] = []

        class Recording(submitit.AutoExecutor):
            def map_array(self, fn: Any, *iterable: Any) -> List[Any]:
                recorded.extend((self, args) for args in zip(*iterable))
                return [SimpleNamespace(results=lambda: [None])] * len(recorded)

            def _internal_update_parameters(self, **kwargs: Any) -> None:
                delay = kwargs.pop("local_signal_delay_s", None)  # taken by the local executor only
                super()._internal_update_parameters(**kwargs)
                if delay is not None:
                    self._executor.update_parameters(signal_delay_s=delay)

        with mock.patch.object(submitit, "AutoExecutor", Recording):
            super().launch([s.overrides for s in slots], slots[0].num)  # type: ignore[misc]
        for slot, (executor, args) in zip(slots, recorded):
            fn = copy.copy(self)
            if configs.get(slot.num) is not None:
                fn.hydra_context = dataclasses.replace(
                    self.hydra_context, config_loader=_Composed(self.hydra_context.config_loader, configs[slot.num]))
            slot.params = (executor, fn, args)

    def _adopt(self, slots: List[_Slot]) -> None:
        """SLURM: give slots the live jobs an earlier launch of this sweep left."""

    def _wait(self, slots: List[_Slot]) -> None:
        deadline = None if self.max_wait_h is None else time.time() + self.max_wait_h * 3600
        while True:
            self._submit(slots)
            live = [s for s in slots if s.job is not None and s.result is None]
            if not live and all(s.result is not None for s in slots):
                return
            states, now = self._states(live), time.time()
            for s in live:
                st = None if states is None else states.get(str(s.job.job_id))
                s.state = s.state if states is None else (st or "not known to the scheduler")
                verdict, s.gone_since = judge(s.job.paths.result_pickle.exists(), states is not None, st,
                                              s.gone_since, now, self.lost_after_s)
                if verdict == "done":
                    try:
                        s.result = s.job.results()[0]
                    except Exception as e:  # noqa: BLE001 - submitit's UncompletedJobError / FailedJobError
                        s.fail(JobDiedError(f"{self._EXECUTOR} job {s.job.job_id} (sweep job {s}) failed outside "
                                            f"the task: {e}"))
                elif verdict == "lost":
                    s.fail(self._died(s))
            if deadline is not None and now > deadline:
                for s in (s for s in slots if s.result is None):
                    s.fail(WaitTimeoutError(
                        f"sweep job {s} still not done after max_wait_h={self.max_wait_h} (job "
                        f"{getattr(s.job, 'job_id', None)}, {s.state}); it was left running: re-launch the same "
                        f"sweep (same hydra.sweep.dir) later to collect it (jobs with a results.json are skipped)"))
            if any(s.result is None for s in slots):
                time.sleep(self.poll_s)

    def _died(self, slot: _Slot) -> JobDiedError:
        paths = slot.job.paths
        msg = (f"{self._EXECUTOR} job {slot.job.job_id} (sweep job #{slot.num}) ended without writing a result "
               f"(scheduler state: {slot.state}; no result {self.lost_after_s:.0f} s later): killed (scancel, "
               f"out of memory, node failure) or crashed hard.\noverrides: {' '.join(filter_overrides(slot.overrides))}"
               f"\nlogs: {paths.stderr}\n      {paths.stdout}")
        tails = ["\n".join(Path(p).read_text(errors="replace").splitlines()[-25:]) for p in (paths.stderr, paths.stdout)
                 if Path(p).is_file()]
        msg += "".join(f"\n--- end of its log ---\n{t}" for t in [t for t in tails if t][:1])
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
            raise RuntimeError("hydra/launcher=slurm: sbatch/srun not found, this is not a SLURM login node. On one "
                               "machine use hydra/launcher=local; for a local test cluster run "
                               "scripts/slurm_local.sh start (root, Debian/Ubuntu)")
        return super().launch(job_overrides, initial_job_idx)

    def _submit(self, slots: List[_Slot]) -> None:
        todo = [s for s in slots if s.job is None and s.result is None]
        for executor in {id(s.params[0]): s.params[0] for s in todo}.values():  # one array per executor
            group = [s for s in todo if s.params[0] is executor]
            with executor.batch():
                jobs = [executor.submit(s.params[1], *s.params[2]) for s in group]
            for s, job in zip(group, jobs):
                s.job = job
            log.info(f"submitted job {jobs[0].job_id}" if len(jobs) == 1 else
                     f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks)")

    def _states(self, slots: List[_Slot]) -> Optional[Dict[str, str]]:
        return slurm_states([str(s.job.job_id) for s in slots])

    def _adopt(self, slots: List[_Slot]) -> None:
        """Jobs of an earlier launch of this sweep (submitit's folders ``<job id>``) still queued or
        running take the slots of their overrides (read from submitit's pickled submission)."""
        import submitit

        folder = str(self.params["submitit_folder"])
        root = Path(folder.split("%j")[0])
        earlier = [d.name for d in root.iterdir() if d.name.replace("_", "").isdigit()] \
            if "%j" in folder and root.is_dir() else []
        states = (slurm_states(earlier) or {}) if earlier else {}
        todo = {tuple(s.overrides): s for s in slots if s.result is None and s.job is None}
        for job_id in sorted(j for j in earlier if states.get(j, "").upper() in ALIVE_STATES):
            job = submitit.SlurmJob(folder=folder, job_id=job_id)
            try:
                slot = todo.pop(tuple(job.submission().args[0]), None)
            except Exception as e:  # noqa: BLE001 - no or unreadable submission: not ours to adopt
                log.debug(f"slurm job {job_id}: cannot read its submission: {e}")
                continue
            if slot is not None:
                slot.job = job
                log.info(f"\t#{slot.num} : already {states[job_id]} as slurm job {job_id} (an earlier launch of "
                         f"this sweep); waiting for it instead of submitting it again")


class LocalLauncher(_Bounded, upstream.LocalLauncher):
    """One process per job on this machine, at most ``array_parallelism`` at once."""

    def __init__(self, array_parallelism: int = 1, **params: Any) -> None:
        self.array_parallelism = max(1, int(array_parallelism or 1))
        super().__init__(**params)

    def _submit(self, slots: List[_Slot]) -> None:
        free = self.array_parallelism - sum(s.job is not None and s.result is None for s in slots)
        for s in [s for s in slots if s.job is None and s.result is None][:max(0, free)]:
            s.job = s.params[0].submit(s.params[1], *s.params[2])

    def _states(self, slots: List[_Slot]) -> Dict[str, str]:
        return {str(s.job.job_id): s.job.state for s in slots}
