"""LoRA (NOAH's setting), docs/REFERENCE.md §1.2."""
import copy

import torch

import peft_vit
from conftest import assert_batched_equals_one_by_one, TINY_MODEL, VIT_B16, build, train_steps
from peft_vit.backbone import create_backbone
from peft_vit.methods.lora import LoRADelta


def test_vit_b16_count_q_v():  # the default's count: test_method_contract.py
    with torch.device("meta"):
        model = build("lora", VIT_B16, targets=["q", "v"])
    assert peft_vit.count_parameters(model)["trainable_params_no_head"] == 294_912


def test_defaults_are_noah():
    with torch.device("meta"):
        delta = build("lora", VIT_B16).blocks[0].attn.qkv.deltas["all"]
    assert delta.lora_A.shape == (8, 768) and delta.lora_B.shape == (2304, 8)
    assert delta.scale == 1.0 and delta.dropout.p == 0.1
    delta = build("lora").blocks[0].attn.qkv.deltas["all"]
    assert torch.count_nonzero(delta.lora_B) == 0
    bound = 1 / 64 ** 0.5  # kaiming-uniform(a=√5) on (8, 64)
    assert delta.lora_A.abs().max() <= bound and delta.lora_A.abs().max() > 0.8 * bound


def test_q_v_targets_leave_k_rows_alone():
    model = train_steps(build("lora", targets=["q", "v"]), steps=3)
    assert set(model.blocks[1].attn.qkv.deltas) == {"q", "v"}
    w0 = build("linear").blocks[1].attn.qkv.weight.detach().clone()
    w = peft_vit.merge(model).blocks[1].attn.qkv.weight
    D = 64
    assert torch.equal(w[D:2 * D], w0[D:2 * D])
    assert not torch.allclose(w[:D], w0[:D]) and not torch.allclose(w[2 * D:], w0[2 * D:])


def _peft_lora(r, alpha):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    backbone = create_backbone(**TINY_MODEL)
    cfg = LoraConfig(target_modules=["qkv"], r=r, lora_alpha=alpha, lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(backbone), cfg).eval()


def _peft_layers(ref):
    from peft.tuners.lora import Linear as PeftLoraLinear

    return [m for n, m in ref.named_modules() if isinstance(m, PeftLoraLinear)]


def test_equals_huggingface_peft_on_fused_qkv(tiny_input):
    ours = build("lora", dropout=0.0).eval()
    ref = _peft_lora(r=8, alpha=8)
    layers = _peft_layers(ref)
    assert len(layers) == 2
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk, layer in zip(ours.blocks, layers):
            delta = blk.attn.qkv.deltas["all"]
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=g) * 0.1)
            layer.lora_A["default"].weight.copy_(delta.lora_A)
            layer.lora_B["default"].weight.copy_(delta.lora_B)
        out = ours(tiny_input)
        assert not torch.allclose(out, build("linear").eval()(tiny_input), atol=1e-3)
        torch.testing.assert_close(out, ref(tiny_input), atol=1e-5, rtol=1e-5)


def test_q_v_equals_peft_block_diagonal_lora(tiny_input):
    """Separate q and v LoRAs (rank 8 each) are one rank-16 LoRA on qkv with A = [A_q; A_v] and a
    block-diagonal B whose k rows are zero."""
    ours = build("lora", dropout=0.0, targets=["q", "v"]).eval()
    ref = _peft_lora(r=16, alpha=16)  # scale 1, as ours
    D = 64
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for blk, layer in zip(ours.blocks, _peft_layers(ref)):
            dq, dv = blk.attn.qkv.deltas["q"], blk.attn.qkv.deltas["v"]
            for d in (dq, dv):
                d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.1)
            b = torch.zeros(3 * D, 16)
            b[:D, :8], b[2 * D:, 8:] = dq.lora_B, dv.lora_B
            layer.lora_A["default"].weight.copy_(torch.cat([dq.lora_A, dv.lora_A]))
            layer.lora_B["default"].weight.copy_(b)
        torch.testing.assert_close(ours(tiny_input), ref(tiny_input), atol=1e-5, rtol=1e-5)


def test_alpha_scales():
    d = LoRADelta(32, 16, rank=4, alpha=8.0)
    with torch.no_grad():
        d.lora_B.normal_()
    x = torch.randn(3, 16)
    torch.testing.assert_close(d(x, None, None), 2.0 * x @ (d.lora_B @ d.lora_A).T)
    torch.testing.assert_close(d.delta_weight(None), 2.0 * d.lora_B @ d.lora_A)


def test_q_v_batched_step_equals_block_by_block(tiny_input):
    """q and v of every layer run together (a forward pre-hook batches them); forward_features
    alone (no hook) runs each block's LoRA on its own: same outputs and gradients."""
    model = build("lora", dropout=0.0, targets=["v", "q"], alpha=16.0).train()  # scale 2
    with torch.no_grad():
        for d in model.modules():
            if isinstance(d, LoRADelta):
                d.lora_B.normal_(0, 0.1)
    assert_batched_equals_one_by_one(model, tiny_input)
