"""scripts/benchmark_task.py end to end on CPU: a tiny generated task, a tiny ViT, one method and
the peer-style reference loop, with every figure it reports."""
import json

import pytest

from test_data_scripts import script

pytestmark = pytest.mark.slow


def test_benchmark_task_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = script("benchmark_task").main([
        "--methods", "linear", "--train", "24", "--test", "10", "--src-size", "40x30", "--epochs", "2",
        "--eval-every", "1", "--peer", "--peer-epochs", "1", "--peer-eval", "8", "--peer-workers", "0",
        "--root", str(tmp_path / "vtab"), "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
        "--override", "model=vit_tiny_test", "trainer.batch_size=8", "trainer.num_workers=0"])
    assert rc == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["method"] == "linear" and "error" not in run
    for k in ("startup_s", "train_img_s", "eval_img_s", "run_s", "wall_s"):
        assert run[k] > 0, k
    assert run["wall_s"] >= run["run_s"] >= run["startup_s"]
    assert res["peer"]["train_img_s"] > 0 and res["peer"]["projected_task_s"] > 0
    assert len(list((tmp_path / "cache").glob("cifar-*.npy"))) == 2  # built once, before the runs
    printed = capsys.readouterr().out
    assert "speedup_vs_peer" in printed and "startup_s" in printed
