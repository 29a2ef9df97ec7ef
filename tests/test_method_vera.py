"""VeRA (Kopiczko, Blankevoort & Asano, ICLR 2024); reference: HF peft's VeraConfig."""
import copy

import timm
import torch

import peft_vit
from conftest import TINY_MODEL, VIT_B16, build, train_steps
from peft_vit.backbone import create_backbone
from peft_vit.methods.vera import VeRADelta


def test_vit_b16_count_and_shapes():
    """q and v of 12 blocks, each d (256) and b (768): 12 · 2 · (768 + 256); one shared A, B."""
    with torch.device("meta"):
        model = build("vera", VIT_B16)
    assert peft_vit.count_parameters(model)["trainable_params_no_head"] == 24_576 == 12 * 2 * (768 + 256)
    assert model.vera.vera_A.shape == (256, 768) and model.vera.vera_B.shape == (768, 256)
    assert set(model.blocks[0].attn.qkv.deltas) == {"q", "v"}


def _cfg(**kw):
    from omegaconf import OmegaConf

    from conftest import method_cfg
    return OmegaConf.create({"model": TINY_MODEL, "method": method_cfg("vera", **kw)})


def test_projections_are_seeded_buffers_saved_with_the_run(tiny_input):
    a = build("vera", rank=8)  # global seed 0
    torch.manual_seed(7)
    b = peft_vit.build_model(_cfg(rank=8))  # another global seed: another backbone, the same A, B
    other = build("vera", rank=8, projection_seed=1)
    assert torch.equal(b.vera.vera_A, a.vera.vera_A) and torch.equal(b.vera.vera_B, a.vera.vera_B)
    assert not torch.equal(other.vera.vera_A, a.vera.vera_A)
    assert {"vera.vera_A", "vera.vera_B"} <= set(a.state_dict())
    assert not any(n.startswith("vera.") for n, _ in a.named_parameters())  # frozen: buffers
    # a run's weights carry the projections: loading them into another seed's model restores them
    other.load_state_dict(train_steps(a, steps=2).state_dict())
    assert torch.equal(other.vera.vera_A, a.vera.vera_A)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(tiny_input), a(tiny_input))


def test_increment_is_the_papers_formula():
    model = train_steps(build("vera", rank=16), steps=3)
    A, B, D = model.vera.vera_A, model.vera.vera_B, 64
    q = model.blocks[1].attn.qkv.deltas["q"]
    expected = torch.diag(q.vera_b) @ B[:D] @ torch.diag(q.vera_d) @ A[:, :D]
    w0 = build("linear").blocks[1].attn.qkv.weight
    w = peft_vit.merge(model).blocks[1].attn.qkv.weight
    torch.testing.assert_close(w[:D] - w0[:D], expected.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(w[D:2 * D], w0[D:2 * D])  # k is not adapted


def test_equals_huggingface_peft(tiny_input):
    """The whole fused qkv as in HF peft: the same seed draws the same A and B; with the same d
    and b the outputs agree."""
    from peft import VeraConfig, get_peft_model
    from peft.tuners.vera import Linear as PeftVeraLinear

    ours = build("vera", rank=16, targets=["qkv"], projection_seed=5).eval()
    torch.manual_seed(0)
    ref = get_peft_model(copy.deepcopy(create_backbone(**TINY_MODEL)),
                         VeraConfig(r=16, target_modules=["qkv"], projection_prng_key=5, vera_dropout=0.0)).eval()
    layers = [m for m in ref.modules() if isinstance(m, PeftVeraLinear)]
    assert len(layers) == 2
    torch.testing.assert_close(layers[0].vera_A["default"], ours.vera.vera_A, atol=0, rtol=0)
    torch.testing.assert_close(layers[0].vera_B["default"], ours.vera.vera_B, atol=0, rtol=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk, layer in zip(ours.blocks, layers):
            delta = blk.attn.qkv.deltas["all"]
            delta.vera_d.copy_(torch.randn(16, generator=g))
            delta.vera_b.copy_(torch.randn(192, generator=g) * 0.1)
            layer.vera_lambda_d["default"].copy_(delta.vera_d)
            layer.vera_lambda_b["default"].copy_(delta.vera_b)
        out = ours(tiny_input)
        assert not torch.allclose(out, build("linear").eval()(tiny_input), atol=1e-3)
        torch.testing.assert_close(out, ref(tiny_input), atol=1e-5, rtol=1e-5)


def test_swin_slices_the_shared_projections(tiny_input):
    """Swin's stages differ in width (32, 64): one A, B sized for the largest, sliced per stage."""
    def swin():
        torch.manual_seed(0)
        return timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10, img_size=32,
                                 patch_size=2, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4))
    model = peft_vit.methods.get_method("vera", rank=8).apply(swin())
    assert model.vera.vera_A.shape == (8, 64) and model.vera.vera_B.shape == (64, 8)
    d0 = model.layers[0].blocks[0].attn.qkv.deltas["q"]
    assert isinstance(d0, VeRADelta) and d0.vera_b.shape == (32,)
    train_steps(model, tiny_input, steps=3)
    with torch.no_grad():
        ref = model(tiny_input)
        assert not torch.allclose(ref, swin().eval()(tiny_input), atol=1e-4)
        torch.testing.assert_close(peft_vit.merge(model)(tiny_input), ref, atol=1e-5, rtol=1e-5)
