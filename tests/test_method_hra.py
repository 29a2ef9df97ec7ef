"""HRA: equality with huggingface/peft's HRA (outputs and gradients from the same vectors), the
chain's orthogonality and rank, the init options. The contract (count, identity at start,
training, digits) is in test_method_contract.py, exact merging in test_merge.py."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import assert_batched_equals_one_by_one, VIT_B16, build
from peft_vit.methods.base import AdaptedLinear
from peft_vit.methods.hra import HRADelta


def _ours(lin, rank, init="random", gram_schmidt=False):
    ours = AdaptedLinear(copy.deepcopy(lin), weight_space=True)
    ours.add("all", (0, lin.out_features), HRADelta(lin.in_features, rank, init, gram_schmidt))
    return ours


def compare_with_peft(rank=6, gram_schmidt=False, seed=0):
    """Max |ours − peft| of the outputs and of the vectors' gradients, peft's vectors copied."""
    import peft  # the test extra (pyproject.toml)

    torch.manual_seed(seed)
    lin = nn.Linear(16, 12)
    ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)),
                              peft.HRAConfig(target_modules=["0"], r=rank, apply_GS=gram_schmidt, init_weights=False))
    theirs = ref.base_model.model[0].hra_u["default"]
    ours = _ours(lin, rank, gram_schmidt=gram_schmidt)
    u = ours.deltas["all"].hra_u
    with torch.no_grad():
        u.copy_(theirs)
    x = torch.randn(5, 7, 16)
    out, want = ours(x), ref(x)
    g1, = torch.autograd.grad(out.square().sum(), [u])
    g2, = torch.autograd.grad(want.square().sum(), [theirs])
    return float((out - want).detach().abs().max()), float((g1 - g2).abs().max()), float(g2.abs().max())


@pytest.mark.parametrize("gram_schmidt", [False, True])
def test_equals_huggingface_peft_hra(gram_schmidt):
    out_diff, grad_diff, grad_max = compare_with_peft(gram_schmidt=gram_schmidt)
    assert out_diff < 1e-5 and grad_diff < 1e-5 * max(1.0, grad_max), (out_diff, grad_diff)


def test_same_init_as_peft_symmetric():
    """Pairs of equal vectors, kaiming-uniform on the (in, r/2) tensor: the identity at start."""
    import peft

    torch.manual_seed(0)
    ref = peft.get_peft_model(nn.Sequential(nn.Linear(16, 12)), peft.HRAConfig(target_modules=["0"], r=4))
    torch.manual_seed(0)
    ours = HRADelta(16, 4)
    theirs = ref.base_model.model[0].hra_u["default"]
    assert ours.hra_u.shape == theirs.shape == (16, 4)
    assert torch.equal(ours.hra_u[:, 0], ours.hra_u[:, 1]) and torch.equal(theirs[:, 2], theirs[:, 3])
    w = torch.randn(12, 16)
    torch.testing.assert_close(ours.delta_weight(w), torch.zeros_like(w), atol=1e-6, rtol=0)


def test_chain_is_orthogonal_and_the_update_has_rank_r():
    torch.manual_seed(0)
    delta = HRADelta(32, 3, init="random")
    eye = torch.eye(32)
    chain = delta.delta_weight(eye) + eye  # W = I: W' is the chain H_1 H_2 H_3 itself
    torch.testing.assert_close(chain @ chain.t(), eye, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(delta.delta_weight(torch.randn(24, 32))) == 3


def test_vit_b16_budget_is_htas():
    import peft_vit

    with torch.device("meta"):
        hra, hta = build("hra", VIT_B16), build("householder", VIT_B16)
    assert hra.blocks[0].attn.qkv.deltas["q"].hra_u.shape == (768, 10)
    counts = [peft_vit.count_parameters(m)["trainable_params_no_head"] for m in (hra, hta)]
    assert counts == [24 * 768 * 10, 184_320]


@pytest.mark.parametrize("kwargs,match", [(dict(rank=5), "even rank"), (dict(init="orthogonal"), "init"),
                                          (dict(gram_schmidt=True), "init=random"), (dict(rank=0), "rank")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build("hra", **kwargs)


@pytest.mark.parametrize("kw", [{}, dict(targets=["q", "k", "v", "o", "fc1", "fc2"]), dict(targets=["qkv"]),
                                dict(init="random", gram_schmidt=True)])
def test_batched_step_equals_block_by_block(kw, tiny_input):
    """The model's forward forms every block's factors at once (methods/batched/hra.py);
    forward_features alone runs each HRADelta on its own: same outputs and gradients."""
    model = build("hra", rank=4, **kw).train()
    with torch.no_grad():  # the symmetric init starts at the backbone: move every vector
        for p in model.hra_pack.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert_batched_equals_one_by_one(model, tiny_input)
