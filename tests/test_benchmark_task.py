"""scripts/benchmark_task.py end to end on CPU: a tiny generated task, a tiny ViT, one method eager
and compiled (torch.compile's "eager" backend: tracing only, seconds on a CPU) and the peer-style
reference loop, with every figure it reports; its arithmetic on its own."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO
from test_data_scripts import script


@pytest.mark.slow
def test_benchmark_task_tiny_eager_and_compiled(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = script("benchmark_task").main([
        "--methods", "linear", "--modes", "eager", "compiled", "--compile-backend", "eager",
        "--train", "24", "--test", "10", "--src-size", "40x30", "--epochs", "2",
        "--eval-every", "1", "--peer", "--peer-epochs", "1", "--peer-eval", "8", "--peer-workers", "0",
        "--root", str(tmp_path / "vtab"), "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
        "--override", "model=vit_tiny_test", "trainer.batch_size=8", "trainer.num_workers=0"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["compile_backend"] == "eager" and res["modes"] == ["eager", "compiled"]
    eager, compiled = res["runs"]
    assert (eager["method"], eager["mode"], compiled["method"], compiled["mode"]) == ("linear", "eager", "linear",
                                                                                      "compiled")
    for run in (eager, compiled):
        assert "error" not in run
        for k in ("startup_s", "train_s", "eval_s", "total_s", "train_img_s", "eval_img_s", "run_s"):
            assert run[k] > 0, k
        assert run["evals"] == 2
        # the parts lie inside the run (each rounded to 0.01 s), the run inside the process
        assert run["total_s"] >= run["run_s"] >= run["startup_s"] + run["compile_s"] + run["train_s"] + run["eval_s"] - 0.05
        assert run["train_s"] == pytest.approx(2 * 24 / run["train_img_s"], abs=0.01)
        assert run["other_s"] > 0  # imports at least
        assert run["task_s"] > run["total_s"]  # 100 epochs, 10 evaluations of 10,000 test images
    assert eager["compiled"] is False and eager["compile_s"] == 0
    assert compiled["compiled"] is True and compiled["compile_s"] > 0  # dynamo's tracing, by its own metric
    assert res["peer"]["train_img_s"] > 0 and res["peer"]["projected_task_s"] > 0
    assert len(list((tmp_path / "cache").glob("cifar-*.npy"))) == 2  # built once, before the runs
    printed = capsys.readouterr().out
    for column in ("startup_s", "compile_s", "train_s", "eval_s", "other_s", "total_s", "task_s", "compile_pays",
                   "speedup_vs_peer"):
        assert column in printed and column in res["table"], column
    ratio = round(eager["task_s"] / compiled["task_s"], 2)
    assert f"{ratio}" in res["table"].splitlines()[-1]  # compile_pays on the compiled row


def test_run_seconds_projection_and_budget(tmp_path):
    bt = script("benchmark_task")
    assert [bt.n_evals(e, k) for e, k in ((100, 10), (10, 5), (10, 3), (2, 0))] == [10, 2, 4, 1]
    rec = SimpleNamespace(epochs=10, train_split="train800val200", eval_split="test", history=[{}, {}],
                          startup_s=4.0, compile_time_s=30.0, train_images_per_s=500.0, eval_images_per_s=2000.0,
                          wall_time_s=60.0, compiled=True)
    row = bt.seconds(rec, 70.0, {"train800val200": 1000, "test": 5000})
    assert (row["startup_s"], row["compile_s"], row["train_s"], row["eval_s"], row["other_s"], row["total_s"]) == \
        (4, 30, 20, 5, 11, 70)
    # 100 epochs at 500 img/s, 10 evaluations of 10,000 at 2,000 img/s; start-up, compile and the rest once
    assert bt.project(row, 100, 1000, 10, 10_000) == 45 + 200 + 50
    skipped = bt.train_run("lora", "compiled", [], tmp_path, 0, {}, {})
    assert skipped == {"method": "lora", "mode": "compiled", "error": "skipped: --budget spent"}



def gpu_check(tmp_path, **env):
    return subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path / "out"), **env})


def test_gpu_check_dry_run_and_missing_packages(tmp_path):
    """scripts/gpu_check.sh: its three stages with the GPU settings, each under its own timeout;
    without hydra it stops at once, naming .devpkgs."""
    r = gpu_check(tmp_path, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    env, task, steps = r.stdout.splitlines()
    assert env.startswith("[env] timeout 60 ")
    assert task.startswith("[task] timeout ") and "scripts/benchmark_task.py --methods householder lora adapter " \
        "--modes eager compiled" in task and f"--json {tmp_path}/out/task.json" in task
    assert steps.startswith("[steps] timeout ") and "scripts/benchmark.py --device cuda --batch 64" in steps
    assert not (tmp_path / "out").exists()
    r = gpu_check(tmp_path, PYTHON=f"{sys.executable} -S")  # no site-packages: no hydra
    assert r.returncode == 2 and "copy them into" in r.stderr and ".devpkgs" in r.stderr
    assert os.listdir(tmp_path / "out") == ["summary.txt"]


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path):
    """The whole check with tiny settings: every stage exits 0 within its time, at most seven files."""
    r = gpu_check(tmp_path, BUDGET="400", PYTHON=sys.executable, TASK_ARGS=(
        "--methods linear --modes eager compiled --compile-backend eager --train 24 --test 10 --src-size 40x30 "
        "--epochs 2 --eval-every 1 --override model=vit_tiny_test trainer.batch_size=8 trainer.num_workers=0"),
        STEP_ARGS="--device cpu --model tiny --steps 2 --warmup 1 --methods linear")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["env.txt", "steps.json", "steps.txt", "summary.txt", "task.json", "task.log",
                                       "task.txt"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["env", "task", "steps"]
    assert all(": exit 0 in " in line for line in summary), summary
    task = json.loads((out / "task.json").read_text())
    assert [(run["mode"], "error" in run) for run in task["runs"]] == [("eager", False), ("compiled", False)]
    table = (out / "task.txt").read_text()
    assert "compile_s" in table and "task_s" in table and "compiled" in table and not table.startswith("{")
    assert json.loads((out / "steps.json").read_text())["results"][0]["method"] == "linear"
    assert "torch" in (out / "env.txt").read_text()
