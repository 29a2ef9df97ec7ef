"""FacT-TK (Jie & Deng, AAAI 2023; official code JieShibo/PETL-ViT, FacT/fact_tk.py)."""
import pytest
import timm
import torch

import peft_vit
from conftest import VIT_B16, assert_batched_equals_one_by_one, build
from peft_vit.methods.base import UnsupportedBackboneError
from peft_vit.methods.fact_tk import FacTFactors


def randomised(**kw):
    """The tiny ViT with FacT-TK, every shared factor random (V is zero at init)."""
    model = build("fact_tk", rank=4, scale=3.0, **kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.fact_tk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def merged_increments(model):
    """Each adapted Linear's ΔW, read off the merged weights."""
    before = {n: m.base.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "deltas")}
    merged = peft_vit.merge(model)
    return {n: merged.get_submodule(n).weight - w for n, w in before.items()}


def as_matrix(f, dim):
    """The matrix of the linear map ``x ↦ f(x)`` (f acts on row vectors of width ``dim``)."""
    return f(torch.eye(dim)).t()


@pytest.mark.parametrize("rank,expected", [(32, 86_528), (8, 13_952)])
def test_vit_b16_count(rank, expected):
    """U and V (768·r each), P (r × 144 pieces) and the core (r³), the paper's FacT-TK32 / TK8."""
    with torch.device("meta"):
        model = build("fact_tk", VIT_B16, rank=rank)
    f = model.fact_tk
    assert f.u.shape == (rank, 768) and f.v.shape == (768, rank) and f.p.shape == (rank, 144)
    assert f.c.shape == (rank,) * 3
    assert peft_vit.count_parameters(model)["trainable_params_no_head"] == expected == 2 * 768 * rank + 144 * rank + rank ** 3


def test_init():
    f = FacTFactors(dim=64, rank=8, pieces=24)
    assert torch.count_nonzero(f.v) == 0  # the model starts as the backbone
    assert 0.9 / 64 ** 0.5 < f.u.abs().max() <= 1 / 64 ** 0.5  # nn.Linear(64, 8)'s default
    assert f.c.abs().max() <= (6 / 128) ** 0.5 and f.p.abs().max() <= (6 / 32) ** 0.5  # xavier-uniform


def test_increments_equal_the_official_forward():
    """The official forward, rewritten here as maps of x, gives every merged increment: per block
    12 columns of P (q, k, v, o, fc1 ×4, fc2 ×4), the MLP's cores reshaped as it does."""
    model = randomised()
    f = model.fact_tk
    u, v, c, p, s = f.u.detach(), f.v.detach(), f.c.detach(), f.p.detach(), 3.0
    D, r = 64, 4
    deltas = merged_increments(model)
    for layer in range(2):
        core = c @ p[:, 12 * layer:12 * layer + 12]  # (r, r, 12), as the official code multiplies
        for j, rows in enumerate([slice(0, D), slice(D, 2 * D), slice(2 * D, 3 * D)]):
            qkv = as_matrix(lambda x: (x @ u.t() @ core[:, :, j]) @ v.t() * s, D)
            torch.testing.assert_close(deltas[f"blocks.{layer}.attn.qkv"][rows], qkv)
        proj = as_matrix(lambda x: (x @ u.t() @ core[:, :, 3]) @ v.t() * s, D)
        torch.testing.assert_close(deltas[f"blocks.{layer}.attn.proj"], proj)
        fc1_core = core[:, :, 4:8].reshape(r, 4 * r)
        fc1 = as_matrix(lambda x: ((x @ u.t() @ fc1_core).reshape(-1, 4, r) @ v.t()).reshape(-1, 4 * D) * s, D)
        torch.testing.assert_close(deltas[f"blocks.{layer}.mlp.fc1"], fc1)
        fc2_core = core[:, :, 8:12].reshape(r, 4 * r)
        fc2 = as_matrix(lambda x: ((x.reshape(-1, 4, D) @ u.t()).reshape(-1, 4 * r) @ fc2_core.t()) @ v.t() * s, 4 * D)
        torch.testing.assert_close(deltas[f"blocks.{layer}.mlp.fc2"], fc2)


def test_tucker_layout_is_the_papers_formula():
    """layout=tucker: every D×D piece j is s · V (C ×₃ P_j)ᵀ U, one slice of the core each."""
    model = randomised(layout="tucker")
    f = model.fact_tk
    u, v, s, D = f.u.detach(), f.v.detach(), 3.0, 64
    cores = torch.einsum("abk,kj->jab", f.c.detach(), f.p.detach())
    piece = [s * v @ t.t() @ u for t in cores]
    deltas = merged_increments(model)
    for layer in range(2):
        j = 12 * layer
        torch.testing.assert_close(deltas[f"blocks.{layer}.attn.qkv"], torch.cat(piece[j:j + 3]))
        torch.testing.assert_close(deltas[f"blocks.{layer}.attn.proj"], piece[j + 3])
        torch.testing.assert_close(deltas[f"blocks.{layer}.mlp.fc1"], torch.cat(piece[j + 4:j + 8]))
        torch.testing.assert_close(deltas[f"blocks.{layer}.mlp.fc2"], torch.cat(piece[j + 8:j + 12], 1))


def test_batched_step_equals_one_by_one(tiny_input):
    model = randomised(dropout=0.0).train()
    assert_batched_equals_one_by_one(model, tiny_input)


def test_dropout_after_the_core_in_training_only(tiny_input):
    model = randomised()
    with torch.no_grad():
        ref = model(tiny_input)
        assert not torch.allclose(model.train()(tiny_input), ref, atol=1e-4)
        torch.testing.assert_close(model.eval()(tiny_input), ref)


def test_swin_is_refused():
    swin = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10, img_size=32,
                             patch_size=2, window_size=2, embed_dim=32, depths=(1, 1), num_heads=(2, 4))
    with pytest.raises(UnsupportedBackboneError, match="fact_tk.*swin"):
        peft_vit.methods.get_method("fact_tk").apply(swin)
