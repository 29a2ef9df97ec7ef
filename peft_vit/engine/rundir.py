"""A run directory's state: who owns it (a lock), which configuration made what it holds (a
fingerprint), and leftovers of writers that were killed mid-write.

Fingerprint (``peft_vit/fingerprint.py``): a hash of the resolved config without the
run-invariant keys (``runtime_keys`` in ``configs/config.yaml``). A checkpoint or a results.json
whose fingerprint differs is never used silently; the keys that differ are named.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import PeftVitError
from ..fingerprint import config_diff, fingerprint, result_config
from ..record import RESULTS


class ForeignStateError(PeftVitError, RuntimeError):
    """A checkpoint or record in the run dir was made by a different configuration."""


def check_same_config(what: str, path: Path, stored: Optional[Dict[str, Any]], current: Dict[str, Any],
                      choices: str) -> None:
    """Raise :class:`ForeignStateError` naming the differing keys unless ``stored`` (a flattened
    result config) equals ``current``."""
    if stored is None:
        raise ForeignStateError(f"{what} {path} records no configuration, so it cannot be told to match this "
                                f"run's; {choices}")
    if fingerprint(stored) == fingerprint(current):
        return
    diff = "\n  ".join(config_diff(stored, current))
    raise ForeignStateError(f"{what} {path} was made by a different configuration (stored -> now):\n  {diff}\n"
                            f"{choices}")


def record_config(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The result config of a results.json record (its resolved ``config``)."""
    cfg = record.get("config")
    return result_config(cfg) if isinstance(cfg, dict) else None


def finished_record(path: Path, current: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """skip_done: the results.json at ``path`` if it exists and was made by this configuration
    (``current``, a :func:`result_config`); None if there is none. A record of another
    configuration, or an unreadable one, is a :class:`ForeignStateError` naming the file (and
    the keys that differ): it is never returned in this run's place."""
    path = Path(path)
    if not path.is_file():
        return None
    choices = ("Use another output dir (hydra.run.dir / hydra.sweep.dir), delete the file to run here, or set "
               "skip_done=false to run and overwrite it.")
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ForeignStateError(f"results.json {path} is unreadable ({e}). {choices}") from e
    check_same_config("results.json", path, record_config(record), current, choices)
    return record


def skip_done(cfg: Any, run_dir: Path, current: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The one skip_done decision, made by the loop in the run and by the sweep launchers before
    submission (hydra_plugins/peft_vit_launcher.py): with ``cfg.skip_done``, the record in
    ``run_dir`` if it was made by this configuration (see :func:`finished_record`); None: run.
    ``current``: ``result_config(cfg)`` when the caller has it already."""
    if not cfg.get("skip_done", False):
        return None
    return finished_record(Path(run_dir) / RESULTS, result_config(cfg) if current is None else current)


def remove_stale_temp_files(run_dir: Path) -> List[Path]:
    """Delete the temp files of atomic writes (``.<name>.*.tmp``) that a killed writer left.
    Call only while holding the run dir's lock (no live writer then)."""
    gone = []
    for p in Path(run_dir).glob(".*.tmp"):
        try:
            p.unlink()
            gone.append(p)
        except OSError:
            pass
    return gone


class RunDirBusy(PeftVitError, RuntimeError):
    """Another live process owns the run dir."""


class RunLock:
    """``<run dir>/.lock``, held with ``flock`` for the life of the run; it holds the owner's pid,
    host and start time, for the message a second launch gets. The kernel releases the lock
    when its process dies, however it dies, so a lock file left by a dead process (killed,
    crashed, node rebooted) is simply taken over."""

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.fd: Optional[int] = None
        self.previous: Optional[str] = None  # the owner a stale lock named, if any

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
                os.close(fd)
                raise RunDirBusy(f"run dir {self.path.parent} is in use by {owner} (lock {self.path}); wait for "
                                 f"that run to end, stop it, or choose another output dir") from None
            try:  # the owner may have released (and unlinked) it between our open and flock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.previous = os.pread(fd, 4096, 0).decode(errors="replace").strip() or None
        me = f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode() + b"\n", 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # still ours: nobody else can hold it now
            finally:
                os.close(self.fd)  # releases the flock
                self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
