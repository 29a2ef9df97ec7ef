"""Method-agnostic merge tests: every registered method that can be merged folds into a plain timm
VisionTransformer whose outputs equal the adapted model's; the adapter refuses clearly."""
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import peft_vit
from conftest import TINY_MODEL, build, train_steps
from peft_vit.methods import METHODS, AdaptedLinear, InsertedAfter, NotMergeableError, PeftModule
from peft_vit.methods.base import InputTap, InsertedParallel

NOT_MERGEABLE = {m for m, cls in METHODS.items() if not cls.mergeable}
TRIVIAL = {"linear", "full"}  # nothing to fold
MERGEABLE = sorted(set(METHODS) - NOT_MERGEABLE - TRIVIAL)
WRAPPERS = (PeftModule, AdaptedLinear, InsertedAfter, InsertedParallel, InputTap)


def _fresh_timm():
    return timm.create_model(TINY_MODEL["name"], pretrained=False, num_classes=TINY_MODEL["num_classes"],
                             img_size=TINY_MODEL["img_size"], **TINY_MODEL["overrides"]).eval()


def test_registry_has_the_methods_this_file_covers():
    assert {"linear", "full"} <= set(METHODS) and {"adapter", "adaptformer", "vpt_deep", "convpass"} <= NOT_MERGEABLE
    assert MERGEABLE, "no mergeable method registered"


# every mergeable method at its defaults, plus the target variants that change which blocks of
# the fused qkv (or which other matrices) are adapted
VARIANTS = [(m, {}) for m in MERGEABLE] + [("lora", {"targets": ["q", "v"]}), ("householder", {"targets": "qv"}),
                                           ("householder", {"targets": "qkvo_mlp"}), ("dora", {"targets": ["q", "v"]}),
                                           ("hra", {"init": "random", "gram_schmidt": True}),
                                           ("oft", {"neumann_terms": 5, "targets": ["qkv", "o"]}),
                                           ("boft", {"factors": 3, "block_size": 4, "targets": ["q", "fc2"]}),
                                           ("repadapter", {"placement": "attn"}), ("fact_tt", {"targets": ["q", "v", "fc2"]})]


@pytest.mark.parametrize("method,kwargs", VARIANTS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={v}" for k, v in v.items()) or "default")
def test_merged_equals_unmerged_and_is_plain_vit(method, kwargs, tiny_input):
    model = train_steps(build(method, **kwargs), tiny_input, steps=5)
    with torch.no_grad():
        ref = model(tiny_input)
        assert not torch.allclose(ref, build("linear").eval()(tiny_input), atol=1e-3), "ΔW is still zero"
    out_model = peft_vit.merge(model)
    assert out_model is model
    with torch.no_grad():
        out = model(tiny_input)
    assert torch.allclose(out, ref, atol=1e-4), f"{method}: max diff {(out - ref).abs().max():.2e}"

    # the backbone's own class, module for module, with no method modules or attributes left
    assert type(model) is VisionTransformer
    fresh = _fresh_timm()
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    assert not [n for n, m in model.named_modules() if isinstance(m, WRAPPERS)]
    assert not hasattr(model, "peft_method")
    assert not any(p.requires_grad for p in model.parameters())
    # ... so timm's own model loads its state dict strictly and computes the same outputs
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(tiny_input), ref, atol=1e-4)


@pytest.mark.parametrize("method", sorted(TRIVIAL & set(METHODS)))
def test_baselines_merge_to_themselves(method, tiny_input):
    model = train_steps(build(method), tiny_input, steps=1)
    with torch.no_grad():
        ref = model(tiny_input)
    peft_vit.merge(model)
    assert type(model) is VisionTransformer
    with torch.no_grad():
        assert torch.equal(model(tiny_input), ref)


@pytest.mark.parametrize("method,kwargs", [("adapter", {}), ("adapter", {"placement": "houlsby"}), ("adaptformer", {}),
                                           ("convpass", {})],
                         ids=["pfeiffer", "houlsby", "adaptformer", "convpass"])
def test_adapter_is_not_mergeable(method, kwargs, tiny_input):
    model = train_steps(build(method, **kwargs), tiny_input, steps=1)
    with torch.no_grad():
        before = model(tiny_input)
    with pytest.raises(NotMergeableError, match="not mergeable"):
        peft_vit.merge(model)
    # nothing was folded before the refusal: the same modules, the same outputs
    assert any(isinstance(m, (InsertedAfter, InsertedParallel)) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(tiny_input), before)
