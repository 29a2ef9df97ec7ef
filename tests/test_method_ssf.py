"""SSF (peft_vit/methods/ssf.py): placement after every operation, the count broken down, the
official init, the affine itself at every kind of site, and exact folding on Swin and CLIP."""
import timm
import torch
import torch.nn as nn

import peft_vit
from conftest import VIT_B16, build, train_steps
from peft_vit.methods import InsertedAfter, get_method
from peft_vit.methods.ssf import SITES, SSF

TINY_SWIN = dict(img_size=32, patch_size=2, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4))
TINY_CLIP = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _affines(model):
    return {n[: -len(".inserted")]: m for n, m in model.named_modules() if isinstance(m, SSF)}


def test_vit_b16_placement_and_count_breakdown():
    model = build("ssf", VIT_B16)
    affines = _affines(model)
    dim = 768
    per_block = {"norm1": dim, "attn.qkv": 3 * dim, "attn.proj": dim, "norm2": dim, "mlp.fc1": 4 * dim, "mlp.fc2": dim}
    assert tuple(per_block) == SITES
    expect = {f"blocks.{i}.{s}": w for i in range(12) for s, w in per_block.items()}
    expect.update({"patch_embed.proj": dim, "norm": dim})  # ViT-B/16 has no patch norm, norm_pre or fc_norm
    assert {n: m.gamma.numel() for n, m in affines.items()} == expect
    assert all(m.beta.numel() == m.gamma.numel() for m in affines.values())
    assert 2 * sum(per_block.values()) == 16_896
    total = 12 * 16_896 + 2 * dim + 2 * dim
    assert total == 205_824 == peft_vit.count_parameters(model)["trainable_params_no_head"]
    # one flat tensor holds every γ and β (read by each affine as views)
    assert {n: p.numel() for n, p in model.named_parameters() if p.requires_grad} == {
        "ssf_pack.ssf": 205_824, "head.weight": dim * 100, "head.bias": 100}


def test_official_init():
    torch.manual_seed(0)
    model = build("ssf", VIT_B16)
    g = torch.cat([m.gamma.detach() for m in _affines(model).values()])
    b = torch.cat([m.beta.detach() for m in _affines(model).values()])
    assert abs(g.mean() - 1) < 1e-3 and abs(g.std() - 0.02) < 1e-3
    assert abs(b.mean()) < 1e-3 and abs(b.std() - 0.02) < 1e-3


def test_every_site_computes_the_affine(tiny_input):
    """Each wrapped module returns original(x)·γ + β over its channels (LayerNorm: fused; the patch
    conv: channel dim 1 of NCHW)."""
    model = build("ssf").eval()
    seen = {}

    def grab(name):
        def hook(mod, args, out):
            seen[name] = (args[0], out)
        return hook

    for n, m in model.named_modules():
        if isinstance(m, InsertedAfter):
            m.register_forward_hook(grab(n))
    with torch.no_grad():
        model(tiny_input)
        assert len(seen) == len(_affines(model))
        for n, (x, out) in seen.items():
            wrapped = model.get_submodule(n)
            g, b = wrapped.inserted.gamma, wrapped.inserted.beta
            if isinstance(wrapped.original, nn.Conv2d):
                g, b = g.view(-1, 1, 1), b.view(-1, 1, 1)
            torch.testing.assert_close(out, wrapped.original(x) * g + b, atol=1e-5, rtol=1e-5)


def test_rlrr_uses_the_same_affine():
    from peft_vit.methods import rlrr

    assert rlrr.SSF is SSF


def _merge_exact(name, kw, method="ssf"):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    get_method(method).apply(model)
    model = train_steps(model, steps=3)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        ref = model(x)
    peft_vit.merge(model)
    fresh = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)  # the backbone's own parameter names
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=1e-5, rtol=1e-4)
    return model


def test_swin_placement_widths_by_stage_and_exact_merge():
    torch.manual_seed(0)
    model = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10, **TINY_SWIN)
    get_method("ssf").apply(model)
    widths = {n: m.gamma.numel() for n, m in _affines(model).items()}
    for s, d in ((0, 32), (1, 64)):
        b = f"layers.{s}.blocks.0"
        assert [widths[f"{b}.{x}"] for x in SITES] == [d, 3 * d, d, d, 4 * d, d]
    # patch conv and its norm, the patch-merging norm (4·32 channels), the final norm
    assert {n: w for n, w in widths.items() if ".blocks." not in n} == {
        "patch_embed.proj": 32, "patch_embed.norm": 32, "layers.1.downsample.norm": 128, "norm": 64}
    _merge_exact("swin_base_patch4_window7_224", TINY_SWIN)


def test_clip_bias_free_patch_conv_folds_its_shift_into_the_position_embedding():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=10, **TINY_CLIP)
    assert model.patch_embed.proj.bias is None
    get_method("ssf").apply(model)
    assert "norm_pre" in _affines(model)
    merged = _merge_exact("vit_base_patch16_clip_224", TINY_CLIP)
    assert merged.patch_embed.proj.bias is None
