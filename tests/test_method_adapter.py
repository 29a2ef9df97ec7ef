"""Adapter (docs/REFERENCE.md §1.3): placement, initialisation, counts of the other placements (AdaptFormer's
parallel adapter: test_method_adaptformer.py). The contract
(pfeiffer's count, training, digits) is in test_method_contract.py, the merge refusal in test_merge.py."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers.activations import QuickGELU

import peft_vit
from conftest import VIT_B16, build
from peft_vit.methods import InsertedAfter
from peft_vit.methods.adapter import Adapter

# --------------------------------------------------------------------------- counts

@pytest.mark.parametrize("placement,kw,expected", [  # pfeiffer's 156,768: test_method_contract.py
    ("houlsby", {}, 313_536),               # two adapters per block
    ("pfeiffer", {"bottleneck": 64}, 1_189_632),  # 12 · (2·768·64 + 64 + 768)
])
def test_vit_b16_counts(placement, kw, expected):
    model = build("adapter", VIT_B16, placement=placement, **kw)
    c = peft_vit.count_parameters(model)
    assert c["trainable_params_no_head"] == expected
    assert c["trainable_params"] == expected + 768 * 100 + 100


def test_trainable_set_is_adapters_and_head():
    model = build("adapter")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in names if ".inserted." in n or n.startswith("head.")}
    assert {"head.weight", "head.bias"} <= names


def test_bad_placement():
    with pytest.raises(ValueError, match="placement"):
        build("adapter", placement="middle")
    with pytest.raises(ValueError, match="placement"):  # its own method now: adaptformer.py
        build("adapter", placement="adaptformer")


# --------------------------------------------------------------------------- placement and math

def _manual_block(block, x, adapter=None, attn_adapter=None):
    """timm's Block forward with the adapters placed by hand (eval mode, no layer scale)."""
    h = block.attn(block.norm1(x))
    if attn_adapter is not None:
        h = attn_adapter(h)
    x = x + h
    z = block.mlp(block.norm2(x))
    if adapter is not None:
        z = adapter(z)
    return x + z


def test_pfeiffer_placement_and_formula(tiny_input):
    model = build("adapter").eval()
    for blk in model.blocks:
        assert isinstance(blk.drop_path2, InsertedAfter) and isinstance(blk.drop_path2.inserted, Adapter)
        assert not isinstance(blk.drop_path1, InsertedAfter)
        a = blk.drop_path2.inserted
        assert isinstance(a.act, QuickGELU) and a.dropout.p == 0.1 and a.down.out_features == 8
    blk = model.blocks[0]
    a = blk.drop_path2.inserted
    x = torch.randn(2, 65, 64)
    z = blk.mlp(blk.norm2(x + blk.attn(blk.norm1(x))))
    qg = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731
    a_z = z + F.linear(qg(F.linear(z, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    with torch.no_grad():
        assert torch.allclose(a(z), a_z, atol=1e-6)
        assert torch.allclose(blk(x), _manual_block(blk, x, adapter=a), atol=1e-6)


def test_houlsby_has_two_adapters_per_block():
    model = build("adapter", placement="houlsby").eval()
    for blk in model.blocks:
        assert isinstance(blk.drop_path1.inserted, Adapter) and isinstance(blk.drop_path2.inserted, Adapter)
    blk = model.blocks[1]
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        expect = _manual_block(blk, x, adapter=blk.drop_path2.inserted, attn_adapter=blk.drop_path1.inserted)
        assert torch.allclose(blk(x), expect, atol=1e-6)


# --------------------------------------------------------------------------- initialisation

def test_pfeiffer_init_xavier_tiny_biases_not_identity(tiny_input):
    model = build("adapter").eval()
    for m in model.modules():
        if isinstance(m, Adapter):
            for lin in (m.down, m.up):
                bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
                assert lin.weight.abs().max() <= bound and lin.weight.std() > bound / 4
                assert lin.bias.abs().max() < 1e-5
    plain = build("linear").eval()  # same seed: the same backbone without adapters
    with torch.no_grad():
        # xavier weights: A(z) = z + W_up·act(W_down z) is not the identity at start
        assert not torch.allclose(model(tiny_input), plain(tiny_input), atol=1e-4)
