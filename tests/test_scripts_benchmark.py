"""scripts/benchmark.py on the tiny ViT: one process per method, the counts it reports, the
ratios to full and linear, the target column, and the JSON it writes."""
import importlib.util
import json

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


@pytest.fixture(autouse=True)
def _one_thread_children(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_tiny_run_reports_ratios_counts_and_targets(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = benchmark.main(["--model", "tiny", "--device", "cpu", "--batch", "2", "--steps", "2", "--warmup", "1",
                              "--threads", "1", "--methods", "linear", "full", "lora", "--out", str(out)])
    by = {r["method"]: r for r in results}
    assert set(by) == {"linear", "full", "lora"} and not any("error" in r for r in results)
    assert by["linear"]["trainable_params_no_head"] == 0
    assert by["lora"]["trainable_params_no_head"] == 2 * 8 * (64 + 3 * 64)  # 2 blocks, rank 8 on fused qkv
    assert by["full"]["trainable_params_no_head"] > by["lora"]["trainable_params_no_head"]
    for r in results:
        assert r["step_time_s"] > 0 and r["peak_memory_mb"] > 0 and r["memory_kind"] == "cpu_peak_rss"
        assert r["batch"] == 2 and r["steps"] == 2 and r["device"] == "cpu"
    table = capsys.readouterr().out
    lora_row = next(line for line in table.splitlines() if line.startswith("lora"))
    ratio = by["lora"]["step_time_s"] / by["full"]["step_time_s"]
    assert f"{ratio:.2f}" in lora_row and "≤0.8× full:" in lora_row
    assert next(line for line in table.splitlines() if line.startswith("full")).split()[4] == "1.00"
    saved = json.loads(out.read_text())
    assert saved["table"] in table and [r["method"] for r in saved["results"]] == ["linear", "full", "lora"]


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(SystemExit, match="registered: .*householder"):
        benchmark.main(["--model", "tiny", "--device", "cpu", "--methods", "nope"])


def test_exact_rss_is_labelled_and_not_judged():
    r = dict(method="lora", trainable_params_no_head=1, step_time_s=2.0, images_per_s=1.0, peak_memory_mb=1.0,
             memory_above_model_mb=1.0, memory_kind="cpu_peak_rss_exact", model="m", device="cpu",
             device_name="cpu", threads=1, batch=1, steps=1, warmup=0)
    text = benchmark.table([dict(r, method="full", step_time_s=1.0), r])
    assert "not judged" in text and "MISSED" not in text and "cpu_peak_rss_exact" in text


def test_ops_mode_prints_counts_ratios_and_budgets(tmp_path, capsys):
    out = tmp_path / "ops.json"
    results = benchmark.main(["--ops", "--methods", "full", "lora", "--out", str(out)])
    counts = {r["method"]: r["ops_per_step"] for r in results}
    assert counts["full"] == benchmark.count_step_ops("full") and counts["lora"] < counts["full"]
    table = capsys.readouterr().out
    lora_row = next(line for line in table.splitlines() if line.startswith("lora"))
    assert f"{counts['lora']:,}" in lora_row and f"{counts['lora'] / counts['full']:.2f}" in lora_row
    assert "≤1.0× full: ok" in lora_row
    assert json.loads(out.read_text())["ops_per_step"] == counts


def test_ops_precision_bf16_prints_both_counts():
    """``--ops --precision bf16``: each method's fp32 count, its bf16-autocast count and their ratio."""
    table = benchmark.ops_table({"full": 100, "lora": 80}, {"full": 110, "lora": 84})
    header, _, lora = table.splitlines()[:3]
    assert header.split()[:5] == ["method", "ops/step", "×full", "bf16", "×fp32"]
    assert lora.split()[:5] == ["lora", "80", "0.80", "84", "1.05"] and "bf16 autocast" in table
    linear = benchmark.count_step_ops("linear")
    assert benchmark.count_step_ops("linear", precision="bf16") > linear  # autocast casts: counted
    with pytest.raises(ValueError, match="precision='fp16': choose fp32 or bf16"):
        benchmark.count_step_ops("linear", precision="fp16")
