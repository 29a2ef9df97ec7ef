"""Stop signals: the main process alone handles them.

SLURM (pre-emption, time limit, ``scancel --signal``), ``timeout`` and container runtimes
signal every process of a job, DataLoader workers included. A worker killed by the signal
makes the main process fail inside whatever it was doing (often the checkpoint write). So
workers ignore SIGTERM, SIGUSR2 and SIGINT (``ignore_stop_signals_in_worker``, a
``worker_init_fn``), and the main process sets a flag (:class:`StopSignal`) that the loop
reads at the next step boundary or after the evaluation in progress: it checkpoints, then
hands the signal to whoever had it before (submitit requeues the job on SIGUSR2) or exits.
Workers end when the main process shuts its loaders down (or, after a SIGKILL, when their
watchdog sees the parent gone).
"""
from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def ignore_stop_signals_in_worker(worker_id: int = 0) -> None:
    """``DataLoader(worker_init_fn=...)``: this worker ignores the stop signals."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def worker_init(fn: Optional[Callable[[int], None]] = None) -> Callable[[int], None]:
    """A ``worker_init_fn`` that ignores the stop signals, then calls ``fn`` (if any)."""
    if fn is None:
        return ignore_stop_signals_in_worker

    def init(worker_id: int) -> None:
        ignore_stop_signals_in_worker(worker_id)
        fn(worker_id)

    return init


class StopSignal:
    """SIGTERM / SIGUSR2 / SIGINT set ``signum``; the loop checkpoints at the next step
    boundary, then calls :meth:`forward`. A second SIGINT (Ctrl-C twice) interrupts at once."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signum: Optional[int] = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self.previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def forward(self) -> None:
        """Hand the signal to the handler installed before (e.g. submitit: checkpoint() and
        requeue, then exit), else exit with 128 + signum."""
        signum, prev = self.signum, self.previous.get(self.signum)
        self.restore()
        if callable(prev) and prev is not signal.default_int_handler:
            prev(signum, None)
            self.signum = None
            return
        raise SystemExit(128 + signum)
