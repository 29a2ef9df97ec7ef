"""OFT and BOFT: equality with huggingface/peft's OFT and BOFT (outputs and gradients from the same
parameters), orthogonality, the butterfly permutation, dropout. The contract (count, identity at
start, training, digits) is in test_method_contract.py, exact merging in test_merge.py."""
import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn

from conftest import assert_batched_equals_one_by_one, build
from peft_vit.methods.base import AdaptedLinear
from peft_vit.methods.boft import BOFTDelta, butterfly_perm
from peft_vit.methods.oft import OFTDelta, cayley, skew_map


def _adapted(lin, delta):
    ours = AdaptedLinear(copy.deepcopy(lin), weight_space=True)
    ours.add("all", (0, lin.out_features), delta)
    return ours


def _diffs(ours, ref, x, mine, theirs, to_theirs=lambda g: g):
    """Max |ours − peft| of the outputs and of each parameter's gradient (ours mapped to peft's
    layout), the latter relative to the largest |gradient| (or absolute below 1)."""
    out, want = ours(x), ref(x)
    g1 = torch.autograd.grad(out.square().sum(), mine)
    g2 = torch.autograd.grad(want.square().sum(), theirs)
    return (float((out - want).detach().abs().max()),
            [float((to_theirs(a) - b).abs().max() / max(1.0, float(b.abs().max()))) for a, b in zip(g1, g2)])


def compare_oft_with_peft(neumann_terms=0, block_size=4, seed=0):
    import peft  # the test extra (pyproject.toml)

    torch.manual_seed(seed)
    lin = nn.Linear(16, 12)
    cfg = peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=block_size, init_weights=False,
                         use_cayley_neumann=neumann_terms > 0, num_cayley_neumann_terms=neumann_terms or 5)
    ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)), cfg)
    theirs = ref.base_model.model[0].oft_R["default"].weight  # (blocks, b(b−1)/2): our layout
    ours = _adapted(lin, OFTDelta(16 // block_size, block_size, neumann_terms, 0.0))
    mine = ours.deltas["all"].oft_r
    with torch.no_grad():
        mine.copy_(theirs)
    return _diffs(ours, ref, torch.randn(5, 7, 16), [mine], [theirs])


@pytest.mark.parametrize("neumann_terms", [0, 5, 3])
def test_oft_equals_huggingface_peft(neumann_terms):
    out_diff, (grad_diff,) = compare_oft_with_peft(neumann_terms)
    assert out_diff < 1e-5 and grad_diff < 1e-5, (out_diff, grad_diff)


def compare_boft_with_peft(factors=2, block_size=4, seed=0):
    """peft builds m > 1 factors only with its CUDA kernel ``fbd_cuda`` (else it sets m = 1); here
    its availability check is patched and the kernel (block-diagonal of each factor's blocks)
    is torch.block_diag per factor, so peft runs its own m-factor math on CPU."""
    import peft
    from peft.tuners.boft import layer as boft_layer

    def block_diag(x):  # the kernel's function: (N, D, b, b) -> (N, D·b, D·b)
        return torch.stack([torch.block_diag(*f.unbind(0)) for f in x.unbind(0)])

    torch.manual_seed(seed)
    lin = nn.Linear(16, 12)
    cfg = peft.BOFTConfig(target_modules=["0"], boft_block_size=block_size, boft_n_butterfly_factor=factors,
                          init_weights=False)
    with mock.patch.object(boft_layer, "get_fbd_cuda", return_value=True), \
            mock.patch.object(boft_layer.FastBlockDiag, "apply", side_effect=block_diag):
        ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)), cfg)
        layer = ref.base_model.model[0]
        assert layer.fbd_cuda_available and layer.boft_R["default"].shape[0] == factors
        r, s = layer.boft_R["default"], layer.boft_s["default"]  # (m, D, b, b), (out, 1)
        ours = _adapted(lin, BOFTDelta(16, 12, factors, block_size, 0.0))
        d = ours.deltas["all"]
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        with torch.no_grad():  # peft uses the skew part ½(R − Rᵀ); we store its upper triangle
            d.boft_r.copy_((0.5 * (r - r.transpose(-1, -2)))[..., rows, cols])
            d.boft_s.copy_(s[:, 0])

        def to_peft_layout(g):  # ∂L/∂R_ij = ½ ∂L/∂q_ij above the diagonal, −½ below
            full = g.new_zeros(*g.shape[:-1], block_size, block_size)
            full[..., rows, cols] = 0.5 * g
            return full - full.transpose(-1, -2)

        x = torch.randn(5, 7, 16)
        out_diff, (gr,) = _diffs(ours, ref, x, [d.boft_r], [r], to_peft_layout)
        _, (gs,) = _diffs(ours, ref, x, [d.boft_s], [s], lambda g: g[:, None])
    return out_diff, [gr, gs]


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_boft_equals_huggingface_peft(factors):
    out_diff, grad_diffs = compare_boft_with_peft(factors)
    assert out_diff < 1e-5 and max(grad_diffs) < 1e-5, (out_diff, grad_diffs)


def test_cayley_blocks_are_orthogonal():
    torch.manual_seed(0)
    q = (torch.randn(3, 10) * 0.5) @ skew_map(5)
    assert torch.equal(q, -q.view(3, 5, 5).transpose(-1, -2).reshape(3, 25))
    r = cayley(q.view(3, 5, 5))
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(5).expand(3, 5, 5), atol=1e-5, rtol=0)
    approx = cayley(q.view(3, 5, 5), neumann_terms=5)
    assert not torch.allclose(approx @ approx.transpose(-1, -2), torch.eye(5).expand(3, 5, 5), atol=1e-3)


def test_butterfly_permutation():
    assert torch.equal(butterfly_perm(8, 2, 0), torch.arange(8))
    # factor 1, b = 4: groups of 8, chunks of 2 -> chunks 0, 2, 1, 3
    assert butterfly_perm(16, 4, 1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_boft_rotation_is_orthogonal_and_scaled():
    torch.manual_seed(0)
    d = BOFTDelta(16, 16, 3, 4, 0.0)
    with torch.no_grad():
        d.boft_r.normal_(0, 0.5)
        d.boft_s.uniform_(0.5, 1.5)
    eye = torch.eye(16)
    w = d.delta_weight(eye) + eye  # diag(s) Mᵀ
    torch.testing.assert_close(w @ w.t(), torch.diag(d.boft_s.detach() ** 2), atol=1e-5, rtol=0)


def test_dropout_sets_blocks_to_identity_in_training_only():
    torch.manual_seed(0)
    d = OFTDelta(8, 4, 0, dropout=0.5)
    with torch.no_grad():
        d.oft_r.normal_()
    eye = torch.eye(4)
    blocks = d.train().rotation()
    assert sum(torch.equal(b, eye) for b in blocks) == 4
    assert not any(torch.equal(b, eye) for b in d.eval().rotation())


@pytest.mark.parametrize("method,kwargs,match", [("oft", dict(block_size=24), "block_size"),
                                                 ("oft", dict(neumann_terms=1), "neumann_terms"),
                                                 ("boft", dict(block_size=3), "even block size"),
                                                 ("boft", dict(factors=4, block_size=16), "2\\^"),
                                                 ("boft", dict(factors=0), "factors")])
def test_bad_settings_are_named(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(method, **kwargs)


def _moved(model, pack):
    with torch.no_grad():  # Q = 0 and s = 1 at start: give every parameter a visible effect
        for p in getattr(model, pack).parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("method,kw", [
    ("oft", {}), ("oft", dict(targets=["q", "k", "v", "o", "fc1", "fc2"], block_size=8)), ("oft", dict(targets=["qkv"])),
    ("oft", dict(neumann_terms=5)), ("oft", dict(dropout=0.5)),
    ("boft", {}), ("boft", dict(factors=3, targets=["q", "k", "v", "o", "fc2"])), ("boft", dict(factors=1)),
    ("boft", dict(targets=["v"], dropout=0.5))])
def test_batched_step_equals_block_by_block(method, kw, tiny_input):
    """The model's forward forms every block's rotations at once (methods/batched/oft.py,
    boft.py); forward_features alone runs each delta on its own: same outputs and gradients
    (with dropout in eval mode, where both are off)."""
    model = _moved(build(method, **kw), f"{method}_pack")
    model.train(not kw.get("dropout"))
    assert_batched_equals_one_by_one(model, tiny_input)


def test_batched_dropout_draws_per_matrix():
    """Each matrix draws its own int(p · D) identity positions, the same in all its factors."""
    from peft_vit.methods.batched.oft import block_dropout_each

    torch.manual_seed(0)
    blocks = cayley(torch.randn(40, 2, 8, 3, 3) - torch.randn(40, 2, 8, 3, 3).mT)
    out = block_dropout_each(blocks, 0.5)
    identity = torch.isclose(out, torch.eye(3)).flatten(-2).all(-1)  # (40, 2, 8)
    assert torch.equal(identity[:, 0], identity[:, 1]) and (identity[:, 0].sum(-1) == 4).all()
    assert len({tuple(row.tolist()) for row in identity[:, 0]}) > 1
    torch.testing.assert_close(out[~identity], blocks[~identity])
