"""The op budget of one training step (issue 9): top-level aten ops, counted by
scripts/benchmark.py's count_step_ops (the same function as ``benchmark.py --ops``). A count,
not a timing: each op is at least one kernel launch on a GPU, where small steps are launch-bound.
Under bf16 (issue 22: the frozen backbone held in bf16 as the loop holds it, bf16 autocast) every
PEFT method stays within ``BF16_BUDGET`` × its fp32 count."""
import functools
import importlib.util

import pytest

from conftest import REPO
from peft_vit.methods import METHODS

spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


@functools.lru_cache(maxsize=None)
def fp32_ops(method):
    """fp32 count of a method at its defaults, counted once for this file's tests."""
    return benchmark.count_step_ops(method)


@pytest.fixture(scope="module")
def full_ops():
    return fp32_ops("full")


@pytest.mark.parametrize("method", sorted(benchmark.OP_BUDGETS))
def test_method_within_its_op_budget(method, full_ops):
    n = fp32_ops(method)
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


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(benchmark.BF16_EXEMPT)))
def test_bf16_step_within_budget_of_fp32(method):
    """No per-step casts of frozen weights and no method tensor promoting activations: under bf16
    a step has at most BF16_BUDGET × its fp32 ops (the remaining casts: one per trainable tensor
    and step, and the casts of activation gradients in the backward)."""
    n, b = fp32_ops(method), benchmark.count_step_ops(method, precision="bf16")
    assert b <= benchmark.BF16_BUDGET * n, \
        f"{method}: {b} ops per bf16 step, {b / n:.3f}× its {n} fp32 ops (budget {benchmark.BF16_BUDGET}×)"
