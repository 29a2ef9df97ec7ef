"""The op budget of one training step (issue 9): top-level aten ops, counted by
scripts/benchmark.py's count_step_ops (the same function as ``benchmark.py --ops``). A count,
not a timing: each op is at least one kernel launch on a GPU, where small steps are launch-bound."""
import importlib.util

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


@pytest.fixture(scope="module")
def full_ops():
    return benchmark.count_step_ops("full")


@pytest.mark.parametrize("method", sorted(benchmark.OP_BUDGETS))
def test_method_within_its_op_budget(method, full_ops):
    n = benchmark.count_step_ops(method)
    budget = benchmark.OP_BUDGETS[method] * full_ops
    assert n <= budget, f"{method}: {n} ops per step, budget {budget:.0f} ({benchmark.OP_BUDGETS[method]}× full)"


@pytest.mark.parametrize("method,kw", [("lora", {"targets": ["q", "v"]}), ("householder", {"targets": "qv"})])
def test_fused_block_variants_within_full(method, kw, full_ops):
    """Several blocks of the fused qkv run as one update: no more ops than full fine-tuning."""
    assert benchmark.count_step_ops(method, kw) <= full_ops


def test_count_is_deterministic_and_sees_the_method(full_ops):
    assert benchmark.count_step_ops("full") == full_ops
    # the linear probe stops its backward at the head: far fewer ops than full fine-tuning
    assert benchmark.count_step_ops("linear") < full_ops / 2
