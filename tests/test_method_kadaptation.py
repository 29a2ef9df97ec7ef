"""KAdaptation (He, Li et al., AAAI 2023), docs/REFERENCE.md §1.5."""
import pytest
import torch
import torch.nn.functional as F

import peft_vit
from conftest import VIT_B16, build, train_steps
from peft_vit.methods.kadaptation import KAdaptationDelta, KronBias, KronRules


def deltas(model):
    return [(blk.attn.qkv.deltas["q"], blk.attn.qkv.deltas["v"]) for blk in model.blocks]


@pytest.mark.parametrize("kw,expected", [
    (dict(bias="separate"), 50_176 + 12 * 768), (dict(bias="none"), 50_176 - 12 * 768),
    (dict(n=16), 12 * (2 * 16 * 48 + 768) + 2 * 16 * 64),
    (dict(a_rank=2, b_rank=2), 12 * (2 * 32 * 96 + 768) + 2 * 32 * 128),
])
def test_vit_b16_count_options(kw, expected):
    with torch.device("meta"):
        model = build("kadaptation", VIT_B16, **kw)
    assert peft_vit.count_parameters(model)["trainable_params_no_head"] == expected


def test_sharing():
    model = build("kadaptation")
    (q0, v0), (q1, v1) = deltas(model)
    assert q0.rules is q1.rules and v0.rules is v1.rules and q0.rules is not v0.rules
    assert q0.bias_module is v0.bias_module and q0.bias_module is not q1.bias_module
    assert q0.u.shape == (32, 2, 1) and q0.v.shape == (32, 2, 1) and q0.rules.a.shape == (32, 32, 1)
    # shared parameters appear once in the trainable set
    ids = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == 2 * 2 + 2 * (2 * 2 + 1) + 2  # rules, per layer u/v + bias, head


def test_delta_weight_is_sum_of_kronecker_products():
    torch.manual_seed(0)
    rules = KronRules(n=4, a_dim=4, rank=2).double()
    delta = KAdaptationDelta(12, 8, rules, KronBias(12).double(), b_rank=2, scale=3.0, dropout=0.0).double()
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_()
    expected = sum(torch.kron(rules.a[i] @ rules.b[i].T, delta.u[i] @ delta.v[i].T) for i in range(4)) * 3.0
    torch.testing.assert_close(delta.delta_weight(None), expected)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(delta(x, None, None), F.linear(x, expected, delta.bias_module.bias))


def test_only_q_and_v_blocks_change():
    model = train_steps(build("kadaptation"), steps=3)
    ref = build("linear")
    merged = peft_vit.merge(model)
    D = 64
    for blk, blk0 in zip(merged.blocks, ref.blocks):
        w, w0 = blk.attn.qkv.weight, blk0.attn.qkv.weight
        b, b0 = blk.attn.qkv.bias, blk0.attn.qkv.bias
        assert torch.equal(w[D:2 * D], w0[D:2 * D]) and torch.equal(b[D:2 * D], b0[D:2 * D])
        assert not torch.allclose(w[:D], w0[:D]) and not torch.allclose(w[2 * D:], w0[2 * D:])
        # one per-layer bias, added to both the q and the v output
        torch.testing.assert_close(b[:D] - b0[:D], b[2 * D:] - b0[2 * D:])
        assert not torch.allclose(b[:D], b0[:D])
        for name in ("proj",):
            assert torch.equal(getattr(blk.attn, name).weight, getattr(blk0.attn, name).weight)


def test_dropout_drops_terms_in_training_only():
    torch.manual_seed(0)
    delta = KAdaptationDelta(64, 64, KronRules(32, 32), None, dropout=0.5)
    with torch.no_grad():
        delta.u.normal_()
    x = torch.randn(4, 64)
    delta.eval()
    torch.testing.assert_close(delta(x, None, None), F.linear(x, delta.delta_weight(None)))
    delta.train()
    assert not torch.allclose(delta(x, None, None), F.linear(x, delta.delta_weight(None)))
