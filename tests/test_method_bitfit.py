"""BitFit (peft_vit/methods/bitfit.py): exactly the bias terms train (LayerNorm biases included),
the count broken down, Swin's relative-position tables only on request, and merge keeps the
trained biases in the plain model."""
import timm
import torch

import peft_vit
from conftest import VIT_B16, build, train_steps
from peft_vit.methods import get_method

TINY_SWIN = dict(img_size=32, patch_size=2, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4))


def _trainable(model):
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_vit_b16_trains_every_bias_and_the_head():
    model = build("bitfit", VIT_B16)
    got = _trainable(model)
    dim = 768
    per_block = {"norm1.bias": dim, "attn.qkv.bias": 3 * dim, "attn.proj.bias": dim, "norm2.bias": dim,
                 "mlp.fc1.bias": 4 * dim, "mlp.fc2.bias": dim}
    expect = {f"blocks.{i}.{n}": w for i in range(12) for n, w in per_block.items()}
    expect.update({"patch_embed.proj.bias": dim, "norm.bias": dim, "head.weight": dim * 100, "head.bias": 100})
    assert got == expect
    assert sum(per_block.values()) == 8_448 and 12 * 8_448 + 2 * dim == 102_912
    assert peft_vit.count_parameters(model)["trainable_params_no_head"] == 102_912


def test_swin_relative_position_tables_only_on_request():
    counts = {}
    for tables in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10, **TINY_SWIN)
        get_method("bitfit", tables=tables).apply(model)
        names = _trainable(model)
        assert any(n.endswith("norm1.bias") for n in names) and "patch_embed.proj.bias" in names
        assert any("relative_position_bias_table" in n for n in names) == tables
        counts[tables] = peft_vit.count_parameters(model)["trainable_params_no_head"]
    tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))
    assert counts[True] == counts[False] + tables


def test_merge_keeps_the_trained_biases(tiny_input):
    model = train_steps(build("bitfit"), tiny_input, steps=3)
    start = build("linear")
    moved = [n for n, p in model.named_parameters()
             if n.endswith(".bias") and not n.startswith("head") and not torch.equal(p, start.get_parameter(n))]
    assert moved, "no backbone bias trained"
    with torch.no_grad():
        ref = model(tiny_input)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert peft_vit.merge(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(model(tiny_input), ref)
