"""RLRR (docs/REFERENCE.md §1.4): targets, block-wise qkv, SSF placement, official init, counts, residual
dropout, training, exact merge."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import peft_vit
from conftest import TINY_MODEL, VIT_B16, build, train_steps
from peft_vit.methods import AdaptedLinear, InsertedAfter, PeftModule
from peft_vit.methods.rlrr import SSF, ResidualDropout, RLRRDelta

LINEARS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


# --------------------------------------------------------------------------- counts

def test_vit_b16_count_breakdown():  # the total: test_method_contract.py
    model = build("rlrr", VIT_B16)
    per_block = sum(p.numel() for p in model.blocks[0].parameters() if p.requires_grad)
    assert per_block == 4 * 2_304 + 6_912 + 4_608 + 2 * 1_536 == 23_808  # the breakdown of docs/REFERENCE.md §1.4
    outside = sum(p.numel() for n, p in model.named_parameters()
                  if p.requires_grad and not n.startswith(("blocks.", "head.")))
    assert outside == 2 * 1_536  # final-norm and patch-embedding SSF


def test_vit_b16_variant_counts():
    assert peft_vit.count_parameters(build("rlrr", VIT_B16, ssf=False))["trainable_params_no_head"] == 248_832
    only_attn = build("rlrr", VIT_B16, targets=["q", "k", "v", "o"], ssf=False)
    assert peft_vit.count_parameters(only_attn)["trainable_params_no_head"] == 12 * 4 * 2_304


# --------------------------------------------------------------------------- structure and math

def test_every_linear_adapted_qkv_blockwise():
    model = build("rlrr")
    for blk in model.blocks:
        for name in LINEARS:
            assert isinstance(blk.get_submodule(name), AdaptedLinear) and blk.get_submodule(name).weight_space
        qkv = blk.attn.qkv
        assert set(qkv.deltas) == {"q", "k", "v"}
        assert [qkv.slices[b] for b in "qkv"] == [(0, 64), (64, 128), (128, 192)]
        s_in = [qkv.deltas[b].s_in for b in "qkv"]
        assert all(s.shape == (64,) for s in s_in)  # 3 own s_in vectors of size D
        assert len({s.data_ptr() for s in s_in}) == 3 and not torch.equal(s_in[0], s_in[1])
        assert all(qkv.deltas[b].s_out.shape == (64,) and qkv.deltas[b].f.shape == (64,) for b in "qkv")
        assert set(blk.mlp.fc1.deltas) == {"all"} and blk.mlp.fc1.deltas["all"].s_out.shape == (256,)
        assert blk.mlp.fc2.deltas["all"].s_in.shape == (256,)


def test_linear_formula():
    model = build("rlrr").eval()
    torch.manual_seed(3)
    for d in model.modules():
        if isinstance(d, RLRRDelta):
            d.f.data.normal_()  # f starts at 0: make the bias term visible
    x = torch.randn(2, 5, 64)
    qkv = model.blocks[0].attn.qkv
    W, b = qkv.base.weight, qkv.base.bias
    parts = []
    for i, blk in enumerate("qkv"):
        d = qkv.deltas[blk]
        Wb = W[64 * i:64 * (i + 1)]
        parts.append(F.linear(x, Wb * (1 + torch.outer(d.s_out, d.s_in)), b[64 * i:64 * (i + 1)] + d.f))
    with torch.no_grad():
        assert torch.allclose(qkv(x), torch.cat(parts, -1), atol=1e-5)
        fc1 = model.blocks[1].mlp.fc1
        d = fc1.deltas["all"]
        expect = F.linear(x, fc1.base.weight * (1 + torch.outer(d.s_out, d.s_in)), fc1.base.bias + d.f)
        assert torch.allclose(fc1(x), expect, atol=1e-5)


def test_ssf_placement():
    model = build("rlrr").eval()
    for blk in model.blocks:
        for ln in (blk.norm1, blk.norm2):
            assert isinstance(ln, InsertedAfter) and isinstance(ln.inserted, SSF)
            assert isinstance(ln.original, nn.LayerNorm)
    assert isinstance(model.norm, InsertedAfter) and isinstance(model.norm.inserted, SSF)
    assert isinstance(model.patch_embed, InsertedAfter) and isinstance(model.patch_embed.inserted, SSF)
    x = torch.randn(2, 3, 32, 32)
    pe, s = model.patch_embed.original, model.patch_embed.inserted
    with torch.no_grad():
        assert torch.allclose(model.patch_embed(x), pe(x) * s.gamma + s.beta)
        h = torch.randn(2, 65, 64)
        n, s = model.norm.original, model.norm.inserted
        assert torch.allclose(model.norm(h), n(h) * s.gamma + s.beta)


def test_official_init_not_identity(tiny_input):
    model = build("rlrr", VIT_B16)
    fc1 = model.blocks[0].mlp.fc1.deltas["all"]  # in 768, out 3072
    fc2 = model.blocks[0].mlp.fc2.deltas["all"]  # in 3072, out 768
    for d, fan_in in ((fc1, 768), (fc2, 3072)):
        assert d.s_in.abs().max() <= math.sqrt(6 / fan_in)
        assert d.s_in.abs().max() > 0.9 * math.sqrt(6 / fan_in)  # uniform over the whole range
        assert d.s_out.abs().max() <= math.sqrt(6) and d.s_out.abs().max() > 0.9 * math.sqrt(6)
        assert torch.all(d.f == 0)
    gammas = torch.cat([m.gamma for m in model.modules() if isinstance(m, SSF)])
    betas = torch.cat([m.beta for m in model.modules() if isinstance(m, SSF)])
    assert len(gammas) == 26 * 768
    assert abs(gammas.mean() - 1) < 0.002 and abs(gammas.std() - 0.02) < 0.002
    assert abs(betas.mean()) < 0.002 and abs(betas.std() - 0.02) < 0.002
    tiny, plain = build("rlrr").eval(), build("linear").eval()
    with torch.no_grad():
        assert not torch.allclose(tiny(tiny_input), plain(tiny_input), atol=1e-3)  # ΔW ≠ 0 at start


# --------------------------------------------------------------------------- residual dropout

def test_residual_dropout_rises_linearly():
    model = build("rlrr", dict(TINY_MODEL, overrides=dict(TINY_MODEL["overrides"], depth=5)), drop=0.4)
    rates = [(b.drop_path1.p, b.drop_path2.p) for b in model.blocks]
    assert all(isinstance(b.drop_path1, ResidualDropout) and isinstance(b.drop_path2, ResidualDropout)
               for b in model.blocks)
    assert [r[0] for r in rates] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert all(a == b for a, b in rates)


def test_residual_dropout_is_element_wise_and_replaces_drop_path():
    model = build("rlrr", dict(TINY_MODEL, drop_path_rate=0.1), drop=0.5)
    dp = model.blocks[1].drop_path2  # p = 0.5, replaced timm's DropPath
    assert isinstance(dp, ResidualDropout) and dp.p == 0.5
    dp.train()
    torch.manual_seed(0)
    out = dp(torch.ones(4, 10, 64))
    per_sample = out.flatten(1)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert all(0 < (r == 0).float().mean() < 1 for r in per_sample)  # not whole samples: element-wise
    keep = build("rlrr", dict(TINY_MODEL, drop_path_rate=0.1), drop=None)
    assert type(keep.blocks[1].drop_path2).__name__ == "DropPath"  # drop: null keeps timm's stochastic depth


# --------------------------------------------------------------------------- training and merge

def _assert_plain_vit(model):
    assert type(model) is VisionTransformer
    bad = [n for n, m in model.named_modules()
           if isinstance(m, (PeftModule, AdaptedLinear, InsertedAfter, ResidualDropout))]
    assert not bad, bad


@pytest.mark.parametrize("order", ["merge", "ssf_first", "linears_first"])
def test_merge_exact_in_any_order(order, tiny_input):
    from peft_vit.methods.base import _set_submodule

    model = train_steps(build("rlrr"), tiny_input, steps=3)
    with torch.no_grad():
        ref = model(tiny_input)
        if order != "merge":
            kinds = (InsertedAfter, AdaptedLinear) if order == "ssf_first" else (AdaptedLinear, InsertedAfter)
            for kind in kinds:  # fold one kind by hand, then the other; merge() does the rest
                for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]:
                    _set_submodule(model, n, m.merge())
                assert torch.allclose(model(tiny_input), ref, atol=1e-4)
    peft_vit.merge(model)
    with torch.no_grad():
        out = model(tiny_input)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    _assert_plain_vit(model)
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)


def test_merged_matches_timm_state_dict(tiny_input):
    import timm

    model = train_steps(build("rlrr", drop=0.2), tiny_input, steps=2)
    with torch.no_grad():
        ref = model(tiny_input)
    peft_vit.merge(model)
    fresh = timm.create_model(TINY_MODEL["name"], pretrained=False, num_classes=10, img_size=32,
                              **TINY_MODEL["overrides"]).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(tiny_input), ref, atol=1e-4)
