"""Issue 13, fidelity round two: HTA's add-on init and weight decay, RLRR's decay groups and zero
head, NOAH's init of LoRA and Adapter, KAdaptation's dropout on the update matrix. Each option is
checked both ways; the old behaviour stays selectable."""
import math

import pytest
import torch
from omegaconf import OmegaConf

import peft_vit
from conftest import TINY_MODEL, build
from peft_vit.engine.loop import build_optimizer
from peft_vit.methods.householder import HouseholderDelta, householder_matrix

OPTIM = OmegaConf.create({"name": "adamw", "lr": 0.1, "weight_decay": 0.5, "betas": [0.9, 0.999], "eps": 1e-8})


def decay_step(model):
    """One AdamW step of build_optimizer's groups with every gradient zero: a decayed parameter
    shrinks by (1 − lr·wd) = 0.95, any other stays as it was."""
    opt = build_optimizer(model, OPTIM, torch.device("cpu"))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    return model


def shrunk(before, after):
    """True when decayed (×0.95), False when unchanged; fails on anything else."""
    if torch.equal(before, after):
        return False
    assert torch.allclose(after, before * 0.95), "neither decayed nor unchanged"
    return True


def snapshot(model, getters):
    return {k: g(model).detach().clone() for k, g in getters.items()}


# --------------------------------------------------------------------------- HTA

def hta_addon_vs_h_after_one_adam_step(addon_init, dim=192):
    """‖w_out·w_in‖ / ‖H(v_l) diag(d) H(v_r)‖ after one Adam step from the start."""
    torch.manual_seed(0)
    delta = HouseholderDelta(dim, dim, rank=1, addon_init=addon_init)
    opt = torch.optim.Adam(delta.parameters(), lr=1e-3)
    x, g = torch.randn(64, dim), torch.randn(64, dim)
    (delta(x, None, None) * g).sum().backward()
    opt.step()
    with torch.no_grad():
        h = (householder_matrix(delta.v_l)[:, :delta.k] * delta.d) @ householder_matrix(delta.v_r)[:delta.k]
        return float((delta.w_out @ delta.w_in).norm() / h.norm())


def test_hta_addon_init_lora_scale():
    """Default: the input-side factor (D'×in) kaiming-uniform(a=√5) = U(±1/√in), output side 0."""
    delta = HouseholderDelta(96, 768, rank=2)
    assert delta.w_in.shape == (2, 768) and delta.w_out.shape == (96, 2)
    assert torch.count_nonzero(delta.w_out) == 0
    bound = 1 / math.sqrt(768)
    assert delta.w_in.abs().max() <= bound and delta.w_in.abs().max() > 0.9 * bound
    assert abs(float(delta.w_in.detach().std()) - bound / math.sqrt(3)) < 0.1 * bound  # U(±b): std b/√3
    # the add-on's first Adam update is of the H-term's size, not an order of magnitude above it
    assert 0.3 < hta_addon_vs_h_after_one_adam_step("lora") < 1.0


def test_hta_addon_init_output_kaiming_is_the_old_one():
    delta = HouseholderDelta(96, 768, rank=1, addon_init="output_kaiming")
    assert torch.count_nonzero(delta.w_in) == 0
    assert delta.w_out.abs().max() <= 1.0 and delta.w_out.abs().max() > 0.9  # fan_in = D' = 1: U(±1)
    # √(in/3) = 8 at in = 192: the add-on swamps the H-term
    assert hta_addon_vs_h_after_one_adam_step("output_kaiming") > 5.0


@pytest.mark.parametrize("addon_init", ["lora", "output_kaiming"])
def test_hta_both_inits_start_at_the_backbone_and_merge(addon_init, tiny_input):
    model = build("householder", addon_init=addon_init).eval()
    plain = build("linear").eval()
    assert torch.allclose(model(tiny_input), plain(tiny_input), atol=1e-6)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("householder_pack.") and n.endswith((".d", ".w_in", ".w_out")):
                p.normal_(0, 0.05)
    out = model(tiny_input)
    assert torch.allclose(peft_vit.merge(model)(tiny_input), out, atol=1e-4)


def test_hta_bad_addon_init_is_named():
    with pytest.raises(ValueError, match="addon_init"):
        build("householder", addon_init="kaiming")


HTA_PARTS = {
    "d": lambda m: m.blocks[0].attn.qkv.deltas["q"].d,
    "v_l": lambda m: m.blocks[1].attn.proj.deltas["all"].v_l,
    "v_r": lambda m: m.blocks[0].attn.qkv.deltas["v"].v_r,
    "w_in": lambda m: m.blocks[1].attn.qkv.deltas["k"].w_in,
    "head.bias": lambda m: m.head.bias,
}


@pytest.mark.parametrize("decay_vectors", [False, True])
def test_hta_decay_vectors(decay_vectors):
    model = build("householder", decay_vectors=decay_vectors)
    with torch.no_grad():
        model.householder_pack.d.normal_()
    before = snapshot(model, HTA_PARTS)
    after = snapshot(decay_step(model), HTA_PARTS)
    got = {k: shrunk(before[k], after[k]) for k in HTA_PARTS}
    assert got == {"d": decay_vectors, "v_l": decay_vectors, "v_r": decay_vectors, "w_in": True, "head.bias": False}


# --------------------------------------------------------------------------- RLRR

RLRR_PARTS = {
    "s_in": lambda m: m.blocks[0].attn.qkv.deltas["k"].s_in,
    "s_out": lambda m: m.blocks[1].mlp.fc2.deltas["all"].s_out,
    "f": lambda m: m.blocks[1].attn.proj.deltas["all"].f,
    "ssf_ln1_gamma": lambda m: m.blocks[0].norm1.inserted.gamma,
    "ssf_ln2_beta": lambda m: m.blocks[1].norm2.inserted.beta,
    "ssf_final_gamma": lambda m: m.norm.inserted.gamma,
    "ssf_patch_gamma": lambda m: m.patch_embed.inserted.gamma,
    "ssf_patch_beta": lambda m: m.patch_embed.inserted.beta,
    "head.weight": lambda m: m.head.weight,
    "head.bias": lambda m: m.head.bias,
}


def test_rlrr_official_decay_groups():
    """zstarN70/RLRR's get_parameters: only names with "bias" or "norm" are exempt."""
    model = build("rlrr")
    with torch.no_grad():
        for d in model.modules():
            if hasattr(d, "f") and isinstance(d.f, torch.Tensor):
                d.f.normal_()
        model.head.bias.normal_()
    before = snapshot(model, RLRR_PARTS)
    after = snapshot(decay_step(model), RLRR_PARTS)
    got = {k: shrunk(before[k], after[k]) for k in RLRR_PARTS}
    assert got == {"s_in": True, "s_out": True, "f": False, "ssf_ln1_gamma": False, "ssf_ln2_beta": False,
                   "ssf_final_gamma": False, "ssf_patch_gamma": True, "ssf_patch_beta": True,
                   "head.weight": True, "head.bias": False}


def test_rlrr_timm_decay_groups_decay_none_of_rlrr():
    model = build("rlrr", decay_groups="timm")
    before = snapshot(model, RLRR_PARTS)
    after = snapshot(decay_step(model), RLRR_PARTS)
    assert {k for k in RLRR_PARTS if shrunk(before[k], after[k])} == {"head.weight"}


def test_rlrr_decay_groups_keep_counts_and_merge(tiny_input):
    official, timm_groups = build("rlrr"), build("rlrr", decay_groups="timm")
    assert peft_vit.count_parameters(official) == peft_vit.count_parameters(timm_groups)
    official.eval()
    timm_groups.eval()
    out = official(tiny_input)
    assert torch.allclose(out, timm_groups(tiny_input), atol=1e-6)  # same init (seed 0), same model
    assert torch.allclose(peft_vit.merge(official)(tiny_input), out, atol=1e-4)
    with pytest.raises(ValueError, match="decay_groups"):
        build("rlrr", decay_groups="none")


def test_zero_head(tiny_input):
    cfg = {"model": dict(TINY_MODEL, zero_head=True), "method": {"name": "rlrr"}}
    model = peft_vit.build_model(OmegaConf.create(cfg))
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.eval()(tiny_input)) == 0
    assert torch.count_nonzero(build("rlrr").head.weight) > 0  # default: timm's head init


# --------------------------------------------------------------------------- NOAH's init

def test_lora_noah_init(tiny_input):
    """NOAH's init_weights re-initialises A and B trunc-normal(0.02): B ≠ 0, not the backbone."""
    model = build("lora", init="noah").eval()
    delta = model.blocks[0].attn.qkv.deltas["all"]
    for w in (delta.lora_A, delta.lora_B):
        assert abs(float(w.detach().std()) - 0.02) < 0.004 and abs(float(w.detach().mean())) < 0.004
    assert not torch.allclose(model(tiny_input), build("linear").eval()(tiny_input), atol=1e-4)
    out = model(tiny_input)
    assert torch.allclose(peft_vit.merge(model)(tiny_input), out, atol=1e-5)


def test_lora_paper_init_is_the_backbone(tiny_input):
    model = build("lora", init="paper", targets=["q", "v"]).eval()
    assert torch.allclose(model(tiny_input), build("linear").eval()(tiny_input), atol=1e-6)
    with pytest.raises(ValueError, match="init"):
        build("lora", init="xavier")


def test_lora_noah_init_packed_targets():
    delta = build("lora", init="noah", targets=["q", "v"]).blocks[1].attn.qkv.deltas["v"]
    assert torch.count_nonzero(delta.lora_B) == delta.lora_B.numel()


@pytest.mark.parametrize("method", ["adapter", "adaptformer"])
def test_adapter_noah_init(method):
    model = build(method, init="noah")
    adapters = [m for m in model.modules() if type(m).__name__ == "Adapter"]
    assert len(adapters) == 2
    w = torch.cat([torch.cat([a.down.weight.flatten(), a.up.weight.flatten()]) for a in adapters])
    assert abs(float(w.detach().std()) - 0.02) < 0.003
    assert all(torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0 for a in adapters)


@pytest.mark.parametrize("method,kind", [("adapter", "xavier"), ("adaptformer", "lora")])
def test_adapter_paper_init_is_the_placements_own(method, kind):
    a = next(m for m in build(method).modules() if type(m).__name__ == "Adapter")  # each method's default init
    if kind == "lora":  # zero up-projection: the parallel branch adds nothing at start
        assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.up.bias) == 0
    else:  # xavier-uniform: bound √(6/(in+out)), tiny biases
        bound = math.sqrt(6 / sum(a.down.weight.shape))
        assert a.down.weight.abs().max() <= bound and a.down.weight.abs().max() > 0.8 * bound
        assert 0 < a.down.bias.abs().max() < 1e-4


# --------------------------------------------------------------------------- KAdaptation

def realised_update(model, block=0):
    """The update the adapted fused qkv of ``block`` adds, for every row of I (one token per input
    unit), in the model's current mode, via the batched path: ((tokens, in) → (tokens, 3·D))."""
    batched = model.kadaptation_batched
    lin = model.blocks[block].attn.qkv
    eye = torch.eye(lin.in_features)
    batched._cache = batched.compute()
    try:
        x = torch.cat([eye, eye]).unsqueeze(0)  # the same inputs twice, in one batch
        with torch.no_grad():
            y = lin(x)[0] - lin.base(x)[0]
    finally:
        batched._cache = None
    bias = y.new_zeros(y.shape[-1])
    for name, d in lin.deltas.items():
        a, b = lin.slices[name]
        if d.bias_module is not None:
            bias[a:b] = d.bias_module.bias
    return (y - bias).view(2, lin.in_features, -1)  # [copy, input unit, output]


def kad_model(mode):
    model = build("kadaptation", dropout_mode=mode)
    with torch.no_grad():  # u = 0 at start: give the update a value
        for d in model.modules():
            if hasattr(d, "u") and isinstance(d.u, torch.Tensor):
                d.u.normal_(0, 0.1)
    return model


def test_kadaptation_matrix_dropout_one_mask_on_the_update():
    """Released code: element-wise dropout on ΔW, one mask for every token of the step."""
    model = kad_model("matrix")
    full = realised_update(model.eval())[0]
    torch.manual_seed(3)
    dropped = realised_update(model.train())
    assert torch.equal(dropped[0], dropped[1])  # one mask, shared by the tokens
    d = model.blocks[0].attn.qkv.deltas["q"].dropout.p
    kept = dropped[0] != 0
    live = full != 0  # the k block is not adapted: its update is 0 either way
    assert torch.allclose(dropped[0][kept], full[kept] / (1 - d), rtol=1e-4, atol=1e-6)
    frac = float((live & ~kept).sum() / live.sum())
    assert abs(frac - d) < 0.05


def test_kadaptation_terms_dropout_masks_each_token():
    model = kad_model("terms")
    full = realised_update(model.eval())[0]
    torch.manual_seed(3)
    dropped = realised_update(model.train())
    assert not torch.equal(dropped[0], dropped[1])
    assert not torch.allclose(dropped[0], full)
    with pytest.raises(ValueError, match="dropout_mode"):
        build("kadaptation", dropout_mode="tokens")


@pytest.mark.parametrize("mode", ["matrix", "terms"])
def test_kadaptation_dropout_modes_agree_at_eval_and_merge(mode, tiny_input):
    model = kad_model(mode).eval()
    out = model(tiny_input)
    assert torch.allclose(out, kad_model("terms" if mode == "matrix" else "matrix").eval()(tiny_input), atol=1e-6)
    assert torch.allclose(peft_vit.merge(model)(tiny_input), out, atol=1e-4)


def test_kadaptation_matrix_dropout_one_by_one_path():
    """A Linear run outside the model's forward (no batched factors) drops ΔW the same way."""
    model = kad_model("matrix").train()
    lin = model.blocks[0].attn.qkv
    delta = lin.deltas["v"]
    a, b = lin.slices["v"]
    eye = torch.eye(lin.in_features)
    torch.manual_seed(0)
    y = delta(torch.cat([eye, eye]), lin.base.weight[a:b], None)
    if delta.bias_module is not None:
        y = y - delta.bias_module.bias
    assert torch.equal(y[: lin.in_features], y[lin.in_features:])
    full = delta.delta_weight(lin.base.weight[a:b]).t()
    kept = y[: lin.in_features] != 0
    assert torch.allclose(y[: lin.in_features][kept], full[kept] / (1 - delta.dropout.p), rtol=1e-4, atol=1e-6)
