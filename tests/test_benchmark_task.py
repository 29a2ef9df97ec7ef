"""scripts/benchmark_task.py end to end on CPU: a tiny generated task, a tiny ViT, one method eager
and compiled (torch.compile's "eager" backend: tracing only, seconds on a CPU) and the peer-style
reference loop, with every figure it reports; its arithmetic on its own."""
import json
from types import SimpleNamespace

import pytest

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
        assert run["task_s"] > run["total_s"]  # 100 epochs, 10 evaluations of 10,000 test images
    assert eager["compiled"] is False and eager["compile_s"] == 0
    assert compiled["compiled"] is True and compiled["compile_s"] > 0  # dynamo's tracing, by its own metric
    assert res["peer"]["train_img_s"] > 0 and res["peer"]["projected_task_s"] > 0
    assert len(list((tmp_path / "cache").glob("cifar-*.npy"))) == 2  # built once, before the runs
    printed = capsys.readouterr().out
    for column in ("startup_s", "compile_s", "train_s", "eval_s", "total_s", "task_s", "compile_pays",
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
    assert (row["startup_s"], row["compile_s"], row["train_s"], row["eval_s"], row["total_s"]) == (4, 30, 20, 5, 70)
    # 100 epochs at 500 img/s, 10 evaluations of 10,000 at 2,000 img/s, the other 45 s once
    assert bt.project(row, 100, 1000, 10, 10_000) == 45 + 200 + 50
    skipped = bt.train_run("lora", "compiled", [], tmp_path, 0, {}, {})
    assert skipped == {"method": "lora", "mode": "compiled", "error": "skipped: --budget spent"}

