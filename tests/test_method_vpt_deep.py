"""VPT-deep (peft_vit/methods/vpt_deep.py): the forward equals the paper's token layout computed by
hand, prefix (register) tokens stay in front, the shallow variant, the official init bound, prompt
dropout, the count broken down, the Swin refusal and the merge refusal. The contract (default
count, training, digits) is in test_method_contract.py."""
import math

import pytest
import timm
import torch

import peft_vit
from conftest import TINY_MODEL, VIT_B16, build, train_steps
from peft_vit.methods import NotMergeableError
from peft_vit.methods.base import UnsupportedBackboneError
from peft_vit.methods.vpt_deep import PromptedBlock, Prompts

TINY_REG = dict(TINY_MODEL, overrides=dict(TINY_MODEL["overrides"], reg_tokens=2))  # DINOv2-style registers


def _by_hand(model, x, deep=True):
    """Official layout: prompts after the prefix tokens; deep: replaced at every block."""
    blocks = list(model.blocks)
    p, n = model.num_prefix_tokens, blocks[0].num_tokens
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(blocks):
        if i == 0:
            h = torch.cat([h[:, :p], blk.prompts.tokens.expand(len(x), -1, -1), h[:, p:]], 1)
        elif deep:
            h = torch.cat([h[:, :p], blk.prompts.tokens.expand(len(x), -1, -1), h[:, p + n:]], 1)
        h = blk.original(h)
    h = model.norm(h)
    return model.forward_head(torch.cat([h[:, :p], h[:, p + n:]], 1))


@pytest.mark.parametrize("deep", [True, False])
@pytest.mark.parametrize("backbone", [TINY_MODEL, TINY_REG], ids=["cls", "cls+2reg"])
def test_forward_is_the_papers_layout(deep, backbone, tiny_input):
    model = train_steps(build("vpt_deep", backbone, deep=deep), tiny_input, steps=2)  # eval: no dropout
    assert all(isinstance(b, PromptedBlock) for b in model.blocks)
    assert [b.prompts is not None for b in model.blocks] == [True] * (len(model.blocks) if deep else 1) + \
        [False] * (0 if deep else len(model.blocks) - 1)
    with torch.no_grad():
        torch.testing.assert_close(model(tiny_input), _by_hand(model, tiny_input, deep), atol=1e-5, rtol=1e-5)


def test_prompts_sit_after_the_prefix_tokens_and_leave_after_the_block(tiny_input):
    model = build("vpt_deep", TINY_REG).eval()
    p, n = model.num_prefix_tokens, 10
    assert p == 3
    seen = {}
    model.blocks[1].original.register_forward_pre_hook(lambda m, a: seen.update(inp=a[0]))
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.update(inp_outer=a[0], out=out))
    with torch.no_grad():
        tokens = model.forward_features(tiny_input)
    plain = build("linear", TINY_REG).eval().forward_features(tiny_input)
    assert tokens.shape == plain.shape  # the head sees the backbone's layout
    assert seen["inp_outer"].shape == seen["out"].shape == plain.shape
    inp = seen["inp"]
    assert inp.shape[1] == plain.shape[1] + n
    torch.testing.assert_close(inp[:, p:p + n], model.blocks[1].prompts.tokens.expand(4, -1, -1))
    torch.testing.assert_close(inp[:, :p], seen["inp_outer"][:, :p])
    torch.testing.assert_close(inp[:, p + n:], seen["inp_outer"][:, p:])


def test_official_init_bound():
    model = build("vpt_deep")  # tiny: patch 4, D = 64
    bound = math.sqrt(6 / (3 * 4 * 4 + 64))
    t = torch.stack([b.prompts.tokens for b in model.blocks])
    assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound and t.mean().abs() < 0.05 * bound
    assert math.sqrt(6 / (3 * 16 * 16 + 768)) == 0.0625  # ViT-B/16's bound


def test_prompt_dropout_per_sample_and_off_in_eval():
    torch.manual_seed(0)
    prompts = Prompts(10, 64, 0.2, dropout=0.5).train()
    out = prompts(2)
    assert (out == 0).any() and not torch.equal(out[0], out[1])
    assert torch.equal(prompts.eval()(2), prompts.tokens.expand(2, -1, -1))


def test_vit_b16_counts_broken_down():
    deep = build("vpt_deep", VIT_B16)
    assert {n: p.numel() for n, p in deep.named_parameters() if p.requires_grad and "prompts" in n} == \
        {f"blocks.{i}.prompts.tokens": 10 * 768 for i in range(12)}  # 12 · 10 · 768 = 92,160
    shallow = peft_vit.count_parameters(build("vpt_deep", VIT_B16, deep=False, num_tokens=50))
    assert shallow["trainable_params_no_head"] == 50 * 768


def test_swin_refused_with_the_method_and_family():
    swin = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10, img_size=32,
                             patch_size=2, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4))
    with pytest.raises(UnsupportedBackboneError, match=r"vpt_deep.*'swin'"):
        peft_vit.get_method("vpt_deep").apply(swin)


def test_bad_num_tokens():
    with pytest.raises(ValueError, match="num_tokens"):
        build("vpt_deep", num_tokens=0)


def test_not_mergeable(tiny_input):
    model = train_steps(build("vpt_deep"), tiny_input, steps=1)
    with torch.no_grad():
        before = model(tiny_input)
    with pytest.raises(NotMergeableError, match="'vpt_deep' is not mergeable"):
        peft_vit.merge(model)
    with torch.no_grad():
        assert torch.equal(model(tiny_input), before)
