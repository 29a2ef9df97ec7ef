"""Mixed precision without per-step weight casts (issue 22, peft_vit/precision.py): with
``trainer.precision=bf16`` the loop holds the frozen backbone in bf16 and trains fp32 masters;
every method trains so on CPU, its bf16 forward stays close to its fp32 one, a merged export comes
from the fp32 weights and equals the unmerged fp32 model, and a resumed bf16 run equals an
uninterrupted one. The op budget under bf16 is in tests/test_op_budget.py."""
import time

import pytest
import torch
import torch.nn as nn
from omegaconf import open_dict

import peft_vit
from conftest import build, compose
from peft_vit.engine import loop
from peft_vit.fingerprint import result_config
from peft_vit.methods import METHODS
from peft_vit.methods.weights import load_layer_state
from peft_vit.precision import held_dtype, hold_frozen_weights
from peft_vit.record import RunContext
from peft_vit.engine.checkpoint import trainable_state

MERGEABLE = sorted(m for m, cls in METHODS.items() if cls.mergeable)


def _run(method, out_dir, *overrides):
    cfg = compose("model=vit_tiny_test", "dataset=demo/digits", f"method={method}", "logger=none",
                  "trainer.num_workers=0", "trainer.progress=false", "trainer.precision=bf16",
                  "trainer.batch_size=64", "trainer.epochs=2", *overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    r = loop.Run(cfg, RunContext(out_dir), result_config(cfg), time.time())
    loop.set_up(r)
    loop.start_logging(r)
    return r


def _epoch(r, epoch, first=0, steps=None):
    import types

    stop = types.SimpleNamespace(signum=None)
    if steps is not None:  # only the last ``steps`` steps of the epoch
        first = r.steps_per_epoch - steps
    with loop.progress_bar(r) as bar:
        loop.train_epoch(r, epoch, first, stop, bar)


def _norms_and_linears(model):
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            yield "norm", mod
        elif isinstance(mod, nn.Linear):
            yield "linear", mod


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_run_holds_frozen_weights_in_bf16_and_trains_fp32_masters(method, tmp_path):
    r = _run(method, tmp_path)
    assert r.amp == torch.bfloat16
    before = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
    _epoch(r, 0, steps=2)
    assert r.train_time > 0
    model = r.model
    frozen_linears = 0
    for kind, mod in _norms_and_linears(model):
        for p in mod.parameters(recurse=False):
            if p.requires_grad:
                assert p.dtype == torch.float32, f"{method}: a trainable {kind} parameter is {p.dtype}"
            elif kind == "norm":
                assert p.dtype == torch.float32, f"{method}: a frozen LayerNorm parameter is {p.dtype}"
            else:
                assert p.dtype == torch.bfloat16, f"{method}: a frozen Linear parameter is {p.dtype}"
                frozen_linears += 1
    if method != "full":
        assert frozen_linears > 0
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())
    assert any(not torch.equal(trained[n], before[n]) for n in before), f"{method}: nothing trained"
    for state in r.optimizer.state.values():  # AdamW's moments of fp32 masters
        assert all(v.dtype == torch.float32 for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_forward_is_close_to_fp32(method, tiny_input):
    """The casts keep the math: the held bf16 model under autocast gives the fp32 model's logits
    within bf16's precision (batched factors are formed in fp32, cast once)."""
    ref = build(method).eval()
    model = build(method).eval()
    held = hold_frozen_weights(model, torch.bfloat16)
    assert (held == 0) if method == "full" else (held > 0 and held_dtype(model) == torch.bfloat16)
    with torch.no_grad():
        want = ref(tiny_input)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(tiny_input)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 0.05, f"{method}: bf16 logits differ from fp32 by {err:.3f} of their range"


def test_merge_refuses_a_bf16_held_model():
    model = build("lora")
    hold_frozen_weights(model, torch.bfloat16)
    with pytest.raises(ValueError, match="must come from the fp32 weights"):
        peft_vit.merge(model)


@pytest.mark.parametrize("method", ["householder", "lora", "rlrr", "ssf", "hra"])
def test_export_from_a_bf16_run_merges_the_fp32_weights_exactly(method, tmp_path, tiny_input):
    """What scripts/export_merged.py does with a bf16 run's trainable.safetensors: a fresh fp32
    model with the trained (fp32) parameters, merged, equals that model unmerged."""
    r = _run(method, tmp_path)
    _epoch(r, 0, steps=2)
    state = trainable_state(r.model)
    assert all(v.dtype == torch.float32 for v in state.values())
    torch.manual_seed(r.cfg.seed)
    fresh = peft_vit.build_model(r.cfg).eval()
    unexpected, absent = load_layer_state(fresh, state)
    assert not unexpected and not absent
    with torch.no_grad():
        want = fresh(tiny_input)
        merged = peft_vit.merge(fresh)
        got = merged(tiny_input)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bf16_resume_equals_uninterrupted(tmp_path):
    """A bf16 run checkpointed after epoch 1 and resumed ends with the same weights as one that
    ran through (checkpoints hold the fp32 trainable tensors; the frozen ones are re-held)."""
    a = _run("householder", tmp_path / "a")
    _epoch(a, 0)
    _epoch(a, 1)
    b = _run("householder", tmp_path / "b")
    _epoch(b, 0)
    loop.save_checkpoint(b, 1, 0)
    c = _run("householder", tmp_path / "b")
    loop.resume(c)
    assert c.start_epoch == 1
    _epoch(c, 1)
    for (n, pa), pc in zip(a.model.named_parameters(), c.model.parameters()):
        assert pa.dtype == pc.dtype and torch.equal(pa, pc), n


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_layer_norm_in_fp32_is_met_too(method, tiny_input, monkeypatch):
    """CUDA autocast runs ``layer_norm`` in fp32 (its fp32 list: inputs cast up, output fp32),
    where CPU autocast keeps a bf16 input bf16. Emulated here on CPU, every method still trains a
    step and keeps the fp32 model's logits: the paths that meet an fp32 LayerNorm output (SSF's,
    RepAdapter's, the AdaptedLinear input) are exercised as a GPU runs them."""
    import torch.nn.functional as F

    layer_norm = F.layer_norm

    def fp32_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        up = lambda t: None if t is None else t.float()  # noqa: E731
        return layer_norm(up(x), shape, up(weight), up(bias), eps)

    ref = build(method).eval()
    model = build(method)
    hold_frozen_weights(model, torch.bfloat16)
    monkeypatch.setattr(F, "layer_norm", fp32_layer_norm)
    with torch.no_grad():
        want = ref(tiny_input)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.eval()(tiny_input)
    assert ((got.float() - want).abs().max() / want.abs().max()) < 0.05
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tiny_input).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
