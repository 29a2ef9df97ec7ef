"""DoRA: the paper's formula, the detached norm, equality with huggingface/peft's DoRA, the count
broken down, Swin. The contract (count, identity at start, training, digits) is in
test_method_contract.py, exact merging in test_merge.py."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import peft_vit
from conftest import VIT_B16, build, train_steps
from peft_vit.methods.base import AdaptedLinear
from peft_vit.methods.dora import DoRADelta


def test_vit_b16_count_broken_down():
    with torch.device("meta"):
        model = build("dora", VIT_B16)
    delta = model.blocks[0].attn.qkv.deltas["all"]
    assert delta.lora_A.shape == (8, 768) and delta.lora_B.shape == (2304, 8) and delta.magnitude.shape == (2304,)
    assert delta.scale == 1.0 and delta.dropout.p == 0.1 and delta.detach_norm
    # LoRA's 294,912 plus one magnitude per output row of each qkv
    assert peft_vit.count_parameters(model)["trainable_params_no_head"] == 294_912 + 12 * 2304 == 322_560


def _adapted(lin, weight_space, rank=4, alpha=8.0, detach_norm=True):
    ours = AdaptedLinear(copy.deepcopy(lin), weight_space=weight_space)
    ours.add("all", (0, lin.out_features), DoRADelta(lin.weight, rank, alpha, 0.0, detach_norm))
    return ours


def _perturb(delta, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=g) * 0.3)
        delta.magnitude.mul_(1 + 0.2 * torch.rand(delta.magnitude.shape, generator=g))


@pytest.mark.parametrize("weight_space", [False, True])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_output_and_gradients_are_the_papers_formula(weight_space, detach_norm):
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    ours = _adapted(lin, weight_space, detach_norm=detach_norm)
    d = ours.deltas["all"]
    _perturb(d)
    x = torch.randn(5, 16)
    # W' = m ⊙ V / ‖V‖ with V = W + s·BA and the norm of each output row
    v = lin.weight + 2.0 * d.lora_B @ d.lora_A
    norm = v.norm(dim=1, keepdim=True)
    expect = F.linear(x, d.magnitude[:, None] * v / (norm.detach() if detach_norm else norm), lin.bias)
    out = ours(x)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    params = [d.lora_A, d.lora_B, d.magnitude]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(expect.square().sum(), params)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_detached_norm_changes_the_gradient_only():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    a, b = _adapted(lin, False, detach_norm=True), _adapted(lin, False, detach_norm=False)
    b.load_state_dict(a.state_dict())
    _perturb(a.deltas["all"]), _perturb(b.deltas["all"])
    x = torch.randn(5, 16)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ga = torch.autograd.grad(ya.sum(), a.deltas["all"].lora_B)[0]
    gb = torch.autograd.grad(yb.sum(), b.deltas["all"].lora_B)[0]
    assert not torch.allclose(ga, gb, atol=1e-4)


@pytest.mark.parametrize("weight_space", [False, True])
def test_equals_huggingface_peft_dora(weight_space):
    """peft's LoRA with use_dora=True, given the same A, B and magnitude: same outputs and grads."""
    import peft  # the test extra (pyproject.toml)

    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    ours = _adapted(lin, weight_space, rank=4, alpha=8.0)
    d = ours.deltas["all"]
    ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)),
                              peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True))
    layer = ref.base_model.model[0]
    # the same magnitude at start: ‖W‖ of each output row
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, d.magnitude)
    _perturb(d)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(d.lora_A)
        layer.lora_B["default"].weight.copy_(d.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(d.magnitude)
    x = torch.randn(5, 16)
    out, want = ours(x), ref(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    theirs = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    for g1, g2 in zip(torch.autograd.grad(out.square().sum(), [d.lora_A, d.lora_B, d.magnitude]),
                      torch.autograd.grad(want.square().sum(), theirs)):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_dropout_zero_runs_one_matmul_with_the_merged_weight(tiny_input):
    assert not build("dora").blocks[0].attn.qkv.weight_space
    model = train_steps(build("dora", dropout=0.0), tiny_input, steps=3)
    assert model.blocks[0].attn.qkv.weight_space
    with torch.no_grad():
        ref = model(tiny_input)
        torch.testing.assert_close(peft_vit.merge(model)(tiny_input), ref, atol=1e-5, rtol=1e-5)


def test_swin_injects_and_merges_exactly():
    model = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10, img_size=32,
                              patch_size=2, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4))
    peft_vit.get_method("dora").apply(model)
    mags = [m.magnitude.numel() for m in model.modules() if isinstance(m, DoRADelta)]
    assert mags == [3 * 32, 3 * 64]  # one magnitude per qkv row, per stage width
    x = torch.randn(2, 3, 32, 32)
    train_steps(model, x, steps=3)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(peft_vit.merge(model)(x), ref, atol=1e-5, rtol=1e-5)
