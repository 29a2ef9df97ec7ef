"""Issue 24: LN tuning, DiffFit, Convpass, RepAdapter and FacT-TT against reference forwards written
here from the official code's math (sources named per test), on the tiny ViT with the same
parameters: outputs and gradients. The reference reads our parameter tensors through its own
functional graph, so the two gradients come from two independent computations."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY_MODEL, assert_batched_equals_one_by_one, build, train_steps
from peft_vit.methods.base import AdaptedLinear
from peft_vit.methods.weights import layer_state

FIGURES = {}  # max abs differences, printed by test_report_figures (pytest -s)


def perturb(model, std=0.05):
    """Every trainable tensor moved off its init (zero up-projections included) so that each
    term of the method's math shows in the output."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return model.eval()


def compare(name, model, reference, x):
    """Outputs and the gradients of every trainable tensor: ours vs the reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    ours = model(x)
    ref = reference(x)
    g_ours = torch.autograd.grad(ours.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    out_diff = (ours - ref).abs().max().item()
    grad_diff = max((a - (torch.zeros_like(a) if b is None else b)).abs().max().item() for a, b in zip(g_ours, g_ref))
    FIGURES[name] = (out_diff, grad_diff)
    assert out_diff < 1e-5, (name, out_diff)
    assert grad_diff < 1e-4, (name, grad_diff)


def plain_with(model):
    """A plain timm ViT holding ``model``'s current backbone values (wrappers' names stripped)."""
    plain = build("linear").eval()
    state = {}
    for k, v in model.state_dict().items():
        k = k.replace(".original", "").replace(".base.", ".")
        if k in plain.state_dict():
            state[k] = v
    plain.load_state_dict(state, strict=True)
    return plain


# --------------------------------------------------------------------------- LN tuning, DiffFit

def study_name_rule(words):
    """OSU-MLB/ViT_PEFT_Vision experiment/build_model.py: a parameter trains when its name contains
    one of the tuned words (the head always)."""
    plain = timm.create_model(TINY_MODEL["name"], pretrained=False, num_classes=10, img_size=32, **TINY_MODEL["overrides"])
    return {n for n, _ in plain.named_parameters() if any(w in n for w in words + ("head",))}


def test_ln_tune_trains_what_the_unified_study_trains(tiny_input):
    model = build("ln_tune")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == study_name_rule(("norm",))
    plain = build("linear").eval()
    torch.testing.assert_close(model.eval()(tiny_input), plain(tiny_input), atol=0, rtol=0)


def test_difffit_equals_the_papers_block(tiny_input):
    """DiffFit (Xie et al., ICCV 2023, Algorithm 1; ViT_PEFT_Vision model/block.py):
    x = x + γ₁·Attn(LN1(x)); x = x + γ₂·MLP(LN2(x)); biases, LayerNorms and γ train."""
    model = perturb(build("difffit"))
    trained = set(layer_state(model))  # by layer: the γ of every scale, though the plan packs them
    gammas = {n for n in trained if n.endswith(".gamma")}
    stripped = {n.replace(".original", "") for n in trained - gammas}
    assert stripped == study_name_rule(("bias", "norm")) and len(gammas) == 2 * len(model.blocks)

    def block(i, blk, x):
        ours = model.blocks[i]
        g1, g2 = ours.attn.proj.inserted.gamma, ours.mlp.fc2.inserted.gamma
        lin = lambda m, z: F.linear(z, m.weight, m.bias)  # noqa: E731
        n1, n2 = ours.norm1, ours.norm2
        # the plain block's attention and MLP, computed with our (trainable) tensors
        a = ours.attn
        B, N, C = x.shape
        qkv = lin(a.qkv, n1(x)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, C)
        x = x + g1 * lin(a.proj.original, h)
        m = ours.mlp
        return x + g2 * lin(m.fc2.original, m.act(lin(m.fc1, n2(x))))

    plain = build("linear").eval()
    compare("difffit", model, lambda x: vit_forward(model, plain, x, block), tiny_input)


def vit_forward(model, plain, x, block_fn):
    """timm's VisionTransformer.forward with each block replaced by ``block_fn(i, blk, x)`` (``blk``
    the plain backbone's); the stem, final norm and head are ``model``'s (their tuned values)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for i, blk in enumerate(plain.blocks):
        x = block_fn(i, blk, x)
    return model.forward_head(model.norm(x))


# --------------------------------------------------------------------------- Convpass

def test_convpass_equals_the_official_forward(tiny_input):
    """JieShibo/PETL-ViT convpass/vtab/convpass.py: ``forward_block`` and ``Convpass.forward``
    (patch tokens through the 3×3 conv on their grid, the class token as a 1×1 image)."""
    model = perturb(build("convpass", scale=0.7))
    plain = build("linear").eval()
    s = 0.7

    def official(m, x):
        B, N, C = x.shape
        d = m.down.weight.shape[0]
        side = int((N - 1) ** 0.5)
        xd = F.linear(x, m.down.weight, m.down.bias)
        xd = xd * torch.sigmoid(1.702 * xd)
        xp = xd[:, 1:].reshape(B, side, side, d).permute(0, 3, 1, 2)
        xp = F.conv2d(xp, m.conv.weight, m.conv.bias, 1, 1).permute(0, 2, 3, 1).reshape(B, side * side, d)
        xc = xd[:, :1].reshape(B, 1, 1, d).permute(0, 3, 1, 2)
        xc = F.conv2d(xc, m.conv.weight, m.conv.bias, 1, 1).permute(0, 2, 3, 1).reshape(B, 1, d)
        xd = torch.cat([xc, xp], dim=1)
        xd = xd * torch.sigmoid(1.702 * xd)
        return F.linear(xd, m.up.weight, m.up.bias)

    def block(i, blk, x):
        ours = model.blocks[i]
        x = x + blk.attn(blk.norm1(x)) + official(ours.drop_path1.inserted, blk.norm1(x)) * s
        return x + blk.mlp(blk.norm2(x)) + official(ours.drop_path2.inserted, blk.norm2(x)) * s

    compare("convpass", model, lambda x: vit_forward(model, plain, x, block), tiny_input)


def test_convpass_starts_with_the_identity_conv():
    conv = build("convpass").blocks[0].drop_path1.inserted.conv
    assert torch.equal(conv.weight[:, :, 1, 1], torch.eye(8)) and conv.weight.abs().sum() == 8
    assert build("convpass", xavier_init=True).blocks[0].drop_path1.inserted.conv.weight[:, :, 0, 0].abs().sum() > 0


# --------------------------------------------------------------------------- RepAdapter

def official_repadapter(m, s):
    """luogen1996/RepAdapter repadapter.py ``RepAdapter``: Conv1d(D, h, 1) then the grouped
    Conv1d(h, D, 1, groups=2), ``x + s·conv_B(dropout(conv_A(x)))`` on (B, D, N)."""
    g = m.groups
    wb = m.up_weight.unsqueeze(-1)  # the grouped conv's (D, h/G, 1) weight

    def fn(x):
        t = x.transpose(1, 2)
        a = F.conv1d(t, m.down.weight.unsqueeze(-1), m.down.bias)
        return (F.conv1d(a, wb, m.up_bias, groups=g) * s + t).transpose(1, 2)
    return fn


def test_repadapter_equals_the_official_forward_and_reparameterisation(tiny_input):
    """Forward: ``forward_vit_block_adapter`` (adapter between LN and attention / MLP). Merge: the
    official ``set_RepWeight`` algebra (``sparse2dense``, ``reparameterize``) on qkv and fc1."""
    s = 0.6
    model = perturb(build("repadapter", scale=s))
    plain = build("linear").eval()

    def block(i, blk, x):
        ours = model.blocks[i]
        x = x + blk.attn(official_repadapter(ours.norm1.inserted, s)(blk.norm1(x)))
        return x + blk.mlp(official_repadapter(ours.norm2.inserted, s)(blk.norm2(x)))

    compare("repadapter", model, lambda x: vit_forward(model, plain, x, block), tiny_input)

    def sparse2dense(weight, groups):  # (D, h/G) -> the dense (D, h), as the official
        d, cg = weight.shape
        dg = d // groups
        w = weight.view(groups, dg, cg).transpose(1, 2)
        new = torch.zeros(cg * groups, d)
        for i in range(groups):
            new[i * cg:(i + 1) * cg, i * dg:(i + 1) * dg] = w[i]
        return new.T

    def reparameterize(wa, wb, ba, bb, scale=1, do_residual=False):
        bias = ba @ wb + bb
        eye = torch.eye(wa.shape[0], wb.shape[1]) if do_residual else 0
        return (wa @ wb * scale + eye).T, bias * scale

    with torch.no_grad():
        expected = []
        for i, blk in enumerate(model.blocks):
            for norm, lin in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
                ada = norm.inserted
                w, b = reparameterize(ada.down.weight.T, sparse2dense(ada.up_weight, ada.groups).T,
                                      ada.down.bias, ada.up_bias, s, do_residual=True)
                expected.append(reparameterize(w.T, lin.weight.T, b, lin.bias))
        import peft_vit
        peft_vit.merge(model)
        got = [(lin.weight.T, lin.bias) for blk in model.blocks for lin in (blk.attn.qkv, blk.mlp.fc1)]
    diff = max(max((a.T if a.shape != c.shape else a).sub(c).abs().max().item(), (b - d).abs().max().item())
               for (a, b), (c, d) in zip(got, expected))
    FIGURES["repadapter merge (set_RepWeight)"] = (diff, 0.0)
    assert diff < 1e-5


# --------------------------------------------------------------------------- RepAdapter and Convpass plans

@pytest.mark.parametrize("method,family,kw", [("repadapter", "vit", dict(scale=0.6)), ("repadapter", "swin", {}),
                                              ("repadapter", "vit", dict(placement="attn", groups=4)),
                                              ("convpass", "vit", dict(scale=0.7))], ids=str)
def test_plans_change_no_bit(method, family, kw):
    """The batched plan (methods/batched/repadapter.py: packed parameters and every W_B at once;
    batched/flat.py for Convpass: packed parameters) against each module's own path (forward_features
    alone: no hook): the same outputs and gradients to the bit, dropout on (same seed)."""
    from test_backbone_families import _batch, tiny_model
    model = perturb(build(method, tiny_model(family)) if family != "vit" else build(method, **kw)).train()
    x = _batch(family)[0] if family != "vit" else torch.randn(4, 3, 32, 32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4  # the pack's 1-d and matrix tensors, the head's weight and bias
    torch.manual_seed(9)
    batched = model(x)
    g_batched = torch.autograd.grad(batched.square().sum(), trainable)
    torch.manual_seed(9)
    own = model.forward_head(model.forward_features(x))
    g_own = torch.autograd.grad(own.square().sum(), trainable)
    assert torch.equal(batched, own) and all(torch.equal(a, b) for a, b in zip(g_batched, g_own))


# --------------------------------------------------------------------------- FacT-TT

def test_fact_tt_equals_the_official_forward(tiny_input):
    """JieShibo/PETL-ViT FacT/fact_tt.py: ``fact_forward_attn`` (q, k, v, proj) and
    ``fact_forward_mlp`` (fc1's r→4r core split into four V outputs; fc2's input split into four
    D-blocks, each through U, then the 4r→r core), at eval (dropout off)."""
    s = 3.0
    model = perturb(build("fact_tt", scale=s))
    plain = build("linear").eval()
    blk0 = model.blocks[0]
    shared = blk0.attn.qkv.deltas["all"].shared
    U = lambda z: F.linear(z, shared.u)  # noqa: E731  FacTu = Linear(768, r)
    V = lambda z: F.linear(z, shared.v)  # noqa: E731  FacTv = Linear(r, 768)
    r = shared.u.shape[0]
    piece = {"q": slice(0, r), "k": slice(r, 2 * r), "v": slice(2 * r, 3 * r), "all": slice(None)}
    core = lambda lin, k, z: F.linear(z, lin.deltas["all"].core[piece[k]])  # noqa: E731  the per-layer FacTs

    def block(i, blk, x):
        ours = model.blocks[i]
        a, m = ours.attn, ours.mlp
        B, N, C = x.shape
        h = blk.norm1(x)
        qkv = blk.attn.qkv(h) + torch.cat([V(core(a.qkv, k, U(h))) for k in "qkv"], dim=2) * s
        qkv = qkv.reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, C)
        x = x + blk.attn.proj(o) + V(core(a.proj, "all", U(o))) * s
        h = blk.norm2(x)
        f = blk.mlp.fc1(h) + V(core(m.fc1, "all", U(h)).reshape(B, N, 4, r)).reshape(B, N, 4 * C) * s
        f = blk.mlp.act(f)
        out = blk.mlp.fc2(f) + V(core(m.fc2, "all", U(f.reshape(B, N, 4, C)).reshape(B, N, 4 * r))) * s
        return x + out

    assert isinstance(blk0.mlp.fc1, AdaptedLinear) and blk0.attn.qkv.deltas["all"].core.shape == (3 * r, r)
    compare("fact_tt", model, lambda x: vit_forward(model, plain, x, block), tiny_input)


def test_fact_tt_shares_u_v_across_layers_and_merges(tiny_input):
    import peft_vit

    model = train_steps(build("fact_tt"), tiny_input, steps=3)
    deltas = [d for m in model.modules() if isinstance(m, AdaptedLinear) for d in m.deltas.values()]
    assert len({id(d.factors) for d in deltas}) == 1 and len(deltas) == 4 * len(model.blocks)
    with torch.no_grad():
        ref = model(tiny_input)
        peft_vit.merge(model)
        torch.testing.assert_close(model(tiny_input), ref, atol=1e-5, rtol=1e-5)


def test_fact_tt_qkv_as_blocks_is_the_same_math(tiny_input):
    """``targets: [q, k, v, …]`` (three block deltas) computes what the fused default does with the
    cores [Σ_q; Σ_k; Σ_v] stacked, the same count."""
    fused, blocks = perturb(build("fact_tt")), build("fact_tt", targets=["q", "k", "v", "o", "fc1", "fc2"]).eval()
    with torch.no_grad():
        for fb, bb in zip(fused.blocks, blocks.blocks):
            r = fb.attn.qkv.deltas["all"].core.shape[1]
            for i, k in enumerate("qkv"):
                bb.attn.qkv.deltas[k].core.copy_(fb.attn.qkv.deltas["all"].core[i * r:(i + 1) * r])
            for name in ("attn.proj", "mlp.fc1", "mlp.fc2"):
                bb.get_submodule(name).deltas["all"].core.copy_(fb.get_submodule(name).deltas["all"].core)
        shared_f, shared_b = fused.blocks[0].attn.qkv.deltas["all"].shared, blocks.blocks[0].attn.qkv.deltas["q"].shared
        shared_b.u.copy_(shared_f.u), shared_b.v.copy_(shared_f.v)
        blocks.head.load_state_dict(fused.head.state_dict())
        torch.testing.assert_close(blocks(tiny_input), fused(tiny_input), atol=1e-5, rtol=1e-5)
    import peft_vit
    assert peft_vit.count_parameters(blocks) == peft_vit.count_parameters(fused)


@pytest.mark.parametrize("kw", [{}, dict(scale=3.0), dict(targets=["q", "k", "v", "o", "fc1", "fc2"]),
                                dict(targets=["q", "v", "fc2"], scale=0.5)], ids=str)
def test_fact_tt_batched_step_equals_one_by_one(kw, tiny_input):
    """The model's forward forms every Linear's Q from all cores in one matmul (methods/batched/fact_tt.py);
    forward_features alone runs each delta in the official order: same outputs and gradients."""
    model = perturb(build("fact_tt", dropout=0.0, **kw)).train()
    assert model.fact_tt_pack.core.numel() == sum(m.deltas[k].core.numel() for m in model.modules()
                                                  if isinstance(m, AdaptedLinear) for k in m.deltas)
    assert_batched_equals_one_by_one(model, tiny_input)
    model, x = model.double(), tiny_input.double()  # exact up to rounding: float64 agrees to ~1e-15
    torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)), atol=1e-12, rtol=0)


def test_fact_tt_batched_dropout_masks_the_same_intermediate(tiny_input):
    """Dropout on (tokens, pieces·r) after the core, one call per Linear as the per-layer path: with
    the same seed the same masks, so training steps match too."""
    model = perturb(build("fact_tt")).train()
    torch.manual_seed(9)
    batched = model(tiny_input)
    torch.manual_seed(9)
    one_by_one = model.forward_head(model.forward_features(tiny_input))
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(tiny_input), model.eval()(tiny_input), atol=1e-4)


def test_report_figures():
    """Prints the max abs differences (output, gradient) the tests above measured (run with -s)."""
    for k, (o, g) in FIGURES.items():
        print(f"{k:34s} output {o:.2e}  grad {g:.2e}")
    assert FIGURES, "run with the whole file"
