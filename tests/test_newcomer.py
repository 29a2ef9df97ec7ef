"""What a new user sees, command by command (issue 23): the same command resumes or skips, known
errors in one line, data checked before the model, weight files named, values named by key, and
train.log holding what the terminal showed. Each test runs ``python train.py`` as a user would."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
ENV.pop("PEFT_VIT_TRACEBACK", None)
ENV.pop("HYDRA_FULL_ERROR", None)
TINY = ["model=vit_tiny_test", "dataset=demo/digits", "logger=none", "trainer.num_workers=0",
        "trainer.progress=false", "trainer.batch_size=64", "optim.warmup_epochs=0", "optim.lr=2e-3"]


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def run_dirs(root: Path):
    return sorted(p.parent for p in root.glob("runs/*/*/*/*/.hydra"))


def test_the_same_command_skips_a_finished_run_in_the_same_dir(tmp_path):
    args = [*TINY, "trainer.epochs=1", f"paths.output_root={tmp_path}"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    [d] = run_dirs(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{8}", d.name) and d.parent.name == "final-seed0", d
    assert f"-> {d / 'results.json'}" in first.stdout
    again = cli(*args[::-1], "trainer.progress=true")  # other order, a runtime key: the same run
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"skip: {d / 'results.json'} already exists" in again.stdout, again.stdout
    assert run_dirs(tmp_path) == [d]
    other = cli(*args, "seed=1")
    assert other.returncode == 0 and len(run_dirs(tmp_path)) == 2


@pytest.mark.slow
def test_ctrl_c_names_the_dir_and_the_command_that_resumes(tmp_path):
    args = [*TINY, "method=full", "trainer.epochs=6", "trainer.eval_every=1", f"paths.output_root={tmp_path}"]
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in p.stdout:
        if "epoch 1:" in line:
            p.send_signal(signal.SIGINT)
            break
    out = p.communicate(timeout=120)[0]
    [d] = run_dirs(tmp_path)
    assert p.returncode == 128 + signal.SIGINT, out
    said = re.search(r"signal 2: checkpoint saved at epoch \d+, step \d+ in (\S+); the same command resumes it: "
                     r"(python train\.py .*)", out)
    assert said and Path(said.group(1)) == d, out
    assert said.group(2).split()[2:] == args
    again = cli(*args)
    assert again.returncode == 0 and f"resumed from {d / 'checkpoint.pt'}" in again.stdout, again.stdout
    assert (d / "results.json").exists() and run_dirs(tmp_path) == [d]
