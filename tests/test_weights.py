"""Weight files keyed by layer (peft_vit/methods/weights.py): one tensor per module and parameter
under the module's path, whatever the execution (packed by a batched plan or not), and files
written by main before the change (tests/data/householder_v1, main at 5e0e812) still load."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import TINY_MODEL, build, method_cfg
from peft_vit.backbone import create_backbone
from peft_vit.engine import checkpoint
from peft_vit.methods import get_method
from peft_vit.methods.householder import HouseholderDelta
from peft_vit.methods.weights import layer_state, load_layer_state

OLD = Path(__file__).parent / "data" / "householder_v1"
PLANNED = [("householder", {}), ("householder", dict(targets="qv")), ("lora", dict(targets=["q", "v"])),
           ("rlrr", {}), ("ssf", {}), ("fact_tk", {}), ("vera", {}), ("kadaptation", {}), ("hra", {}), ("oft", {}),
           ("boft", {}), ("fact_tt", {}), ("fact_tt", dict(targets=["q", "v", "fc2"])),
           ("repadapter", {}), ("convpass", {})]


def _build(method: str, batched: bool = True, **kw):
    """``conftest.build``, optionally without the method's batched plan."""
    torch.manual_seed(0)
    cfg = OmegaConf.to_container(method_cfg(method, **kw))
    m = get_method(cfg.pop("name"), **cfg)
    if not batched:
        m.batched = None
    return m.apply(create_backbone(name=TINY_MODEL["name"], num_classes=10, pretrained=False, img_size=32,
                                   overrides=TINY_MODEL["overrides"]))


def _perturb(model, seed=0):
    """Every trainable tensor moved by 0.1·N(0, 1), drawn per layer key (the same for any packing)."""
    g = torch.Generator().manual_seed(seed)
    state = layer_state(model)
    assert load_layer_state(model, {k: state[k] + 0.1 * torch.randn(state[k].shape, generator=g)
                                    for k in sorted(state)}) == ([], [])
    return model


def test_householder_keys_are_one_per_layer_and_parameter():
    model = build("householder")
    state = layer_state(model)
    layers = [f"blocks.{i}.attn.{m}" for i in range(2) for m in ("qkv.deltas.q", "qkv.deltas.k", "qkv.deltas.v",
                                                                 "proj.deltas.all")]
    assert set(state) == {f"{m}.{p}" for m in layers for p in ("d", "v_l", "v_r", "w_in", "w_out")} | \
        {"head.weight", "head.bias"}
    delta = model.blocks[1].attn.qkv.deltas["k"]
    assert isinstance(delta, HouseholderDelta)
    assert torch.equal(state["blocks.1.attn.qkv.deltas.k.d"], delta.d)
    assert state["blocks.1.attn.qkv.deltas.k.v_l"].shape == (64,)


@pytest.mark.parametrize("method,kw", PLANNED, ids=lambda v: v if isinstance(v, str) else str(v))
def test_file_is_independent_of_the_batched_plan(method, kw, tiny_input):
    """The same keys and values with and without the plan; either's file loads into the other."""
    packed, plain = _perturb(_build(method, **kw)), _perturb(_build(method, batched=False, **kw))
    a, b = layer_state(packed), layer_state(plain)
    assert sorted(a) == sorted(b)
    assert not [k for k in a if "_pack" in k or "_batched" in k]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    fresh = _build(method, batched=False, **kw)
    assert load_layer_state(fresh, a) == ([], [])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tiny_input), packed.eval()(tiny_input), rtol=1e-5, atol=1e-6)


def test_main_trainable_file_loads():
    """``trainable.safetensors`` as main wrote it (householder_pack.d, …) loads by the model's own
    packing: every layer's tensors and the model's outputs are main's."""
    old, expected = load_file(str(OLD / "trainable.safetensors")), load_file(str(OLD / "expected.safetensors"))
    assert any(k.startswith("householder_pack.") for k in old)
    model = _build("householder")
    assert load_layer_state(model, old) == ([], [])
    state = layer_state(model)
    assert set(state) == set(expected) - {"_logits", "_input"}
    for k, v in state.items():
        assert torch.equal(v, expected[k]), k
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(expected["_input"]), expected["_logits"], rtol=0, atol=1e-6)
    # written again, keyed by layer, it loads into a model built without the batched plan too
    plain = _build("householder", batched=False)
    assert load_layer_state(plain, state) == ([], [])
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(expected["_input"]), expected["_logits"], rtol=0, atol=1e-6)


def test_main_checkpoint_restores():
    """A checkpoint main wrote (its ``trainable`` packed) restores: weights and optimiser state."""
    state = checkpoint.read(OLD / "checkpoint.pt")
    model = _build("householder")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rng = checkpoint.rng_state()
    try:
        checkpoint.restore(OLD / "checkpoint.pt", state, model=model, optimizer=opt, scheduler=sched,
                           scaler=torch.amp.GradScaler("cpu", enabled=False))
    finally:
        checkpoint.set_rng_state(rng)
    params = dict(model.named_parameters())
    for k, v in state["trainable"].items():
        assert torch.equal(params[k].detach(), v), k
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    moments = opt.state_dict()["state"][trained.index("householder_pack.d")]["exp_avg"]
    assert moments.shape == params["householder_pack.d"].shape and moments.abs().sum() > 0
    # written again, it is keyed by layer
    assert "blocks.0.attn.qkv.deltas.q.d" in checkpoint.trainable_state(model)


def test_fact_tk_factors_under_their_old_name_load():
    model = _perturb(build("fact_tk"))
    old = {(k.replace("fact_tk.", "fact_tk.factors.", 1) if k.startswith("fact_tk.") else k): v
           for k, v in layer_state(model).items()}
    assert "fact_tk.factors.u" in old
    fresh = build("fact_tk")
    assert load_layer_state(fresh, old) == ([], [])
    assert torch.equal(fresh.fact_tk.u, model.fact_tk.u)


def test_mismatch_is_reported_and_loads_nothing():
    model = build("householder")
    state = layer_state(_perturb(build("householder")))
    before = layer_state(model)
    missing = dict(state)
    missing.pop("blocks.0.attn.qkv.deltas.q.d")
    assert load_layer_state(model, missing) == ([], ["blocks.0.attn.qkv.deltas.q.d"])
    assert load_layer_state(model, dict(state, extra=torch.zeros(1))) == (["extra"], [])
    assert all(torch.equal(v, before[k]) for k, v in layer_state(model).items())
    with pytest.raises(ValueError, match="other shapes"):
        load_layer_state(model, dict(state, **{"head.bias": torch.zeros(3)}))
