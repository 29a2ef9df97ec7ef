"""AdaptFormer: the parallel branch's placement and formula, its init, the count broken down, Swin.
The contract (count, identity at start, training, digits) is in test_method_contract.py, the merge
refusal in test_merge.py."""
import pytest
import timm
import torch
import torch.nn.functional as F

import peft_vit
from conftest import VIT_B16, build, train_steps
from peft_vit.methods.adapter import Adapter
from peft_vit.methods.base import InputTap, InsertedParallel


def test_vit_b16_count_broken_down():
    # bottleneck 64 (the paper's): 12 · (down 768·64 + 64, up 64·768 + 768)
    assert peft_vit.count_parameters(build("adaptformer", VIT_B16))["trainable_params_no_head"] \
        == 12 * (768 * 64 + 64 + 64 * 768 + 768) == 1_189_632
    # bottleneck 8: the "0.16M" setting the VTAB-1k tables ran
    assert peft_vit.count_parameters(build("adaptformer", VIT_B16, bottleneck=8))["trainable_params_no_head"] == 156_768


def test_parallel_branch_on_the_pre_ln_stream(tiny_input):
    model = build("adaptformer").eval()
    for blk in model.blocks:
        assert isinstance(blk.norm2, InputTap) and isinstance(blk.drop_path2, InsertedParallel)
        a = blk.drop_path2.inserted
        assert isinstance(a, Adapter) and isinstance(a.act, torch.nn.ReLU)
        assert a.scale == 0.1 and not a.residual and a.dropout.p == 0.1 and a.down.out_features == 64
        # AdaptFormer's init: down kaiming-uniform (bound 1/√in), up and biases zero
        assert 0 < a.down.weight.abs().max() <= 1 / a.down.in_features ** 0.5
        assert not (a.up.weight.any() or a.up.bias.any() or a.down.bias.any())
    train_steps(model, tiny_input, steps=2)  # make the zero-init up-projection non-zero
    blk = model.blocks[0]
    a = blk.drop_path2.inserted
    assert a.up.weight.abs().sum() > 0
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        h = x + blk.attn(blk.norm1(x))
        branch = 0.1 * F.linear(F.relu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        expect = h + blk.mlp(blk.norm2.original(h)) + branch  # the paper's formula, by hand
        assert torch.allclose(blk(x), expect, atol=1e-6)


def test_bad_init():
    with pytest.raises(ValueError, match="init"):
        build("adaptformer", init="bert")


def test_swin_widths_per_stage():
    model = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10, img_size=32,
                              patch_size=2, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4))
    peft_vit.get_method("adaptformer", bottleneck=4).apply(model)
    widths = [m.down.in_features for m in model.modules() if isinstance(m, Adapter)]
    assert widths == [32, 64]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
