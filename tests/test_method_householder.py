"""Householder-SVD adaptation (HTA; Dong et al., NeurIPS 2024), docs/REFERENCE.md §1.1."""
import json

import pytest
import torch
import torch.nn.functional as F

import peft_vit
from conftest import assert_batched_equals_one_by_one, VIT_B16, build, train_steps
from peft_vit.methods.base import AdaptedLinear
from peft_vit.methods.householder import HouseholderDelta, householder_matrix, reflect


@pytest.mark.parametrize("rank,expected", [(0, 110_592), (2, 258_048), (4, 405_504)])  # 1: the contract's
def test_vit_b16_counts(rank, expected):
    with torch.device("meta"):  # counts only: no memory, no init time
        model = build("householder", VIT_B16, rank=rank)
    counts = peft_vit.count_parameters(model)
    assert counts["trainable_params_no_head"] == expected
    assert counts["trainable_params"] == expected + 768 * 100 + 100


def test_target_presets():
    assert len([m for m in build("householder", targets="qv").modules() if isinstance(m, HouseholderDelta)]) == 4
    model = build("householder", targets="qkvo_mlp")
    assert len([m for m in model.modules() if isinstance(m, HouseholderDelta)]) == 12
    with pytest.raises(ValueError):
        build("householder", targets="nope")


def test_default_reflection_is_orthogonal_and_fast_apply_matches():
    torch.manual_seed(0)
    v = torch.randn(64, dtype=torch.float64)
    h = householder_matrix(v)
    torch.testing.assert_close(h @ h.T, torch.eye(64, dtype=torch.float64))
    torch.testing.assert_close(h, h.T)
    x = torch.randn(5, 7, 64, dtype=torch.float64)
    torch.testing.assert_close(reflect(x, v), x @ h)
    # the printed form I − vvᵀ
    torch.testing.assert_close(reflect(x, v, orthogonal=False),
                               x @ (torch.eye(64, dtype=torch.float64) - torch.outer(v, v)))
    assert build("householder").peft_method.reflection == "orthogonal"


@pytest.mark.parametrize("reflection", ["orthogonal", "printed"])
@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256)])
def test_fast_forward_equals_delta_weight(shape, reflection):
    torch.manual_seed(0)
    delta = HouseholderDelta(*shape, rank=2, reflection=reflection).double()
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_()
    x = torch.randn(3, 5, shape[1], dtype=torch.float64)
    torch.testing.assert_close(delta(x, None, None), F.linear(x, delta.delta_weight(None)))


def test_fused_qkv_block_wise():
    model = train_steps(build("householder", targets="qv"), steps=3)
    w0 = build("linear").blocks[0].attn.qkv.weight.detach().clone()
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, AdaptedLinear) and set(qkv.deltas) == {"q", "v"}
    w = peft_vit.merge(model).blocks[0].attn.qkv.weight
    D = 64
    assert torch.equal(w[D:2 * D], w0[D:2 * D])  # k rows untouched
    assert not torch.allclose(w[:D], w0[:D]) and not torch.allclose(w[2 * D:], w0[2 * D:])


def test_report_ranks_and_heatmap(tmp_path):
    from peft_vit.record import RunRecord
    from peft_vit.report.plots import plot_run

    model = build("householder")
    with torch.no_grad():
        model.blocks[1].attn.qkv.deltas["k"].d.copy_(torch.cat([torch.ones(5), torch.full((59,), 1e-4)]))
        # 4 entries of 1, 60 of 0.25: Σd² = 4 + 3.75; 90% (6.975) needs 4 + 48 of them, 99% (7.6725) 4 + 59
        model.blocks[1].attn.proj.deltas["all"].d.copy_(torch.cat([torch.ones(4), torch.full((60,), 0.25)]))
    out = model.peft_method.report(model)
    json.dumps(out)
    rows = out["per_matrix"]
    assert [(r["layer"], r["matrix"]) for r in rows] == [(i, m) for i in (0, 1) for m in ("q", "k", "v", "o")]
    by = {(r["layer"], r["matrix"]): r for r in rows}
    k, o = by[(1, "k")], by[(1, "o")]
    assert k["d_abs_max"] == 1.0 and k["full_rank"] == 64
    assert [k[f"rank_above_{p}pct_max"] for p in (1, 10, 50)] == [5, 5, 5]
    assert [o[f"rank_above_{p}pct_max"] for p in (1, 10, 50)] == [64, 64, 4]
    assert (k["energy_rank_90"], k["energy_rank_99"]) == (5, 5) and (o["energy_rank_90"], o["energy_rank_99"]) == (52, 63)
    assert k["effective_rank"] == 5 and o["effective_rank"] == 52  # the heatmap's: 90% energy
    assert all(v == 0 for key, v in by[(0, "q")].items() if "rank" in key and key != "full_rank")  # d = 0 at start
    assert out["effective_rank_is"].startswith("energy_rank_90")
    record = RunRecord(method="householder", dataset="vtab", task="cifar", protocol="final", seed=0, test_acc=1.0,
                       diagnostics=out)
    assert plot_run(record, tmp_path) == [tmp_path / "householder_rank.png", tmp_path / "householder_rank.json"]
    assert (tmp_path / "householder_rank.png").stat().st_size > 0
    assert json.loads((tmp_path / "householder_rank.json").read_text())["mean_effective_rank"][1] == [0, 5, 0, 52]


def _randomised(model):
    with torch.no_grad():  # d = 0 and w_out = 0 at start: give every factor a visible effect
        for n, p in model.named_parameters():
            if n.startswith("householder_pack.") and n.endswith((".d", ".w_out")):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kw", [{}, dict(targets="qv"), dict(targets="qkvo_mlp"), dict(rank=0),
                                dict(reflection="printed"), dict(targets=["v", "q"], rank=2)])
def test_batched_step_equals_matrix_by_matrix(kw, tiny_input):
    """The model's forward computes every factor at once (a forward pre-hook); forward_features
    alone (no hook) runs each HouseholderDelta on its own: same outputs and gradients."""
    model = _randomised(build("householder", **kw)).train()
    assert_batched_equals_one_by_one(model, tiny_input)


def test_batched_dropout_masks_each_block_and_averages_to_eval():
    model = _randomised(build("householder", dropout=0.3))
    qkv, batched = model.blocks[0].attn.qkv, model.householder_batched
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        model.eval()
        ref = qkv(x)
        model.train()
        batched._cache = batched.compute()
        draws = torch.stack([batched.forward_linear(qkv, qkv.served_by[1], x) for _ in range(3000)])
        batched._cache = None
        xg = batched.dropout(x.reshape(-1, 64).expand(3, 5, 64))
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(xg[0] == 0, xg[1] == 0)  # q, k and v draw their own masks
    torch.testing.assert_close(draws.mean(0), ref, atol=0.06, rtol=0)
