"""SIGKILL a run at random points (training, evaluation, the checkpoint write, the weights and
record writes, right after the record) and re-launch it each time until it finishes: the final
record and weights equal an uninterrupted run's, and nothing half-written is left behind. One
attempt gets a SIGTERM during an evaluation instead: it finishes the evaluation, checkpoints
and exits.
The attempts are driven by tests/kill_driver.py (forked re-launches, kill points by position)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
EPOCHS, STEPS = 3, 6  # digits, tune protocol: 800 training images, 6 steps of 128 per epoch (drop_last)
ARGS = ["model=vit_tiny_test", "dataset=demo/digits", "logger=none", "trainer.num_workers=0", "trainer.progress=false",
        "method=full", "protocol=tune", f"trainer.epochs={EPOCHS}", "trainer.batch_size=128", "trainer.eval_every=1",
        "trainer.checkpoint_every=1", "optim.warmup_epochs=1", "optim.lr=2e-3", "model.drop_path_rate=0.1"]
# fields that depend on the numbers, not on timing or on how the run was launched
SAME = ["val_acc", "best_acc_over_epochs", "best_epoch", "history", "trainable_params", "total_params", "config",
        "config_fingerprint", "method", "dataset", "task", "protocol", "seed", "epochs"]


def plan(seed: int):
    """12 kill points along the run and, before the last epoch, a SIGTERM during an evaluation:
    in run order (positions are global optimiser steps)."""
    rng = random.Random(seed)
    total = EPOCHS * STEPS
    points = [("train", g) for g in rng.sample(range(1, total + 1), 5)]
    points += [("eval", e * STEPS) for e in rng.sample(range(1, EPOCHS + 1), 2)]
    points += [("ckpt", e * STEPS) for e in rng.sample(range(1, EPOCHS), 2)]  # no checkpoint after the last epoch
    points.append(("term_eval", (EPOCHS - 1) * STEPS))
    order = {"train": 0, "eval": 1, "ckpt": 2, "term_eval": 3}
    points.sort(key=lambda p: (p[1], order[p[0]]))
    return points + [("weights", None), ("record", None), ("after_record", None)]


def drive(run_dir, points, tmp_path):
    f = tmp_path / f"plan-{run_dir.name}.json"
    f.write_text(json.dumps(points))
    r = subprocess.run([sys.executable, str(REPO / "tests" / "kill_driver.py"), str(f), *ARGS,
                        f"hydra.run.dir={run_dir}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + r.stderr


def test_sigkill_at_random_points_then_relaunch_equals_uninterrupted(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    summary, _ = drive(ref, [], tmp_path)
    assert summary == {"attempts": 1, "kills": 0, "terms": 0, "codes": [0]}
    points = plan(seed=11)
    summary, log = drive(cut, points, tmp_path)
    kills = len(points) - 1
    # every planned point was reached (killed or stopped the run); the last attempt finished
    assert summary["kills"] == kills >= 10 and summary["terms"] == 1, summary
    assert summary["attempts"] == len(points) + 1 and summary["codes"][-1] == 0, log[-3000:]
    # the SIGTERM during evaluation 2 was handled after it
    assert f"signal 15: checkpoint saved at epoch {EPOCHS - 1}, step 0" in log, log[-3000:]
    print(f"\nkill test: {kills} kill points, {summary['attempts'] - 1} re-launches: {points}")
    # the killed runs' locks were taken over, their half-written files removed
    assert log.count("took over the lock") == kills, log[-3000:]
    assert "removed" in log and ".checkpoint.pt." in log and ".results.json." in log
    assert "skip:" in log  # the attempt killed after its record only had the checkpoint to remove
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, cut))
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    wa, wb = load_file(ref / "trainable.safetensors"), load_file(cut / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical
    # nothing half-written: no temp files, checkpoint, lock or moved-aside files
    left = sorted(p.name for p in cut.iterdir() if p.name not in (".hydra", "train.log"))
    assert left == ["results.json", "trainable.safetensors"], left
