"""Driver for tests/test_kill.py: runs `train.py <overrides>` again and again, SIGKILLing each
attempt at one planned point, until an attempt finishes.

    python tests/kill_driver.py <plan.json> <train.py overrides...>

plan.json: a list of kill points ``[phase, position]``, taken in order, one per attempt, then
one attempt without a kill. Positions are global optimiser steps (the loop's ``gstep``), so a
point lies at the same place of the run whatever checkpoint an attempt resumed from:

* ``train``, g:  right after optimiser step g
* ``eval``, g:   inside the evaluation that follows step g (before its result is used)
* ``ckpt``, g:   half-way through writing the checkpoint that follows step g (temp file half
  written, not yet renamed)
* ``weights`` / ``record``: half-way through writing trainable.safetensors / results.json
* ``after_record``: right after results.json is in place, before the checkpoint is removed
* ``term_eval``, g: not a kill: SIGTERM arrives during the evaluation that follows step g (the
  run is to finish that evaluation, checkpoint and exit with 143)

Attempts are forked from this process once torch, timm and Hydra are imported, so a re-launch
costs a fork, not an interpreter start. Prints one JSON line: attempts, kills and exit codes.
"""
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.chdir(REPO)  # peft_vit: from the editable install (pip install -e .)

import torch  # noqa: E402
from timm.scheduler import CosineLRScheduler  # noqa: E402

import peft_vit.engine.loop as loop  # noqa: E402
import peft_vit.record as record  # noqa: E402
import hydra  # noqa: E402,F401

torch.set_num_threads(1)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str, position):
    """Install the hooks that SIGKILL this (child) process at the point."""
    state = {"gstep": None}
    step_update = CosineLRScheduler.step_update

    def hooked_step_update(self, num_updates, metric=None):
        step_update(self, num_updates, metric)
        state["gstep"] = num_updates
        if phase == "train" and num_updates == position:
            die()

    CosineLRScheduler.step_update = hooked_step_update

    evaluate = loop.evaluate

    def hooked_evaluate(*a, **k):
        if phase == "term_eval" and state["gstep"] == position:
            os.kill(os.getpid(), signal.SIGTERM)
        acc = evaluate(*a, **k)
        if phase == "eval" and state["gstep"] == position:
            die()
        return acc

    loop.evaluate = hooked_evaluate

    targets = {"ckpt": "checkpoint.pt", "weights": "trainable.safetensors", "record": "results.json"}
    fsync = os.fsync

    def hooked_fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if phase in targets and name.startswith(f".{targets[phase]}.") and \
                (phase != "ckpt" or state["gstep"] == position):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)  # a write cut off half-way
            die()
        fsync(fd)

    record.os.fsync = hooked_fsync

    replace = os.replace

    def hooked_replace(src, dst):
        replace(src, dst)
        if phase == "after_record" and str(dst).endswith("results.json"):
            die()

    record.os.replace = hooked_replace


def attempt(point, overrides):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if point is not None:
                arm(*point)
            import runpy

            sys.argv = [str(REPO / "train.py"), *overrides]
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    overrides = sys.argv[2:]
    codes = []
    for point in plan + [None]:
        codes.append(attempt(point, overrides))
        if point is None or codes[-1] not in (-signal.SIGKILL, 128 + signal.SIGTERM):
            break
    print(json.dumps({"attempts": len(codes), "kills": sum(c == -signal.SIGKILL for c in codes),
                      "terms": sum(c == 128 + signal.SIGTERM for c in codes), "codes": codes}))


if __name__ == "__main__":
    main()
