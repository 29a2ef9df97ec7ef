"""The contract every registered method keeps, one row per method: its config keys are its
constructor's parameters, its exact ViT-B/16 count, whether it starts as the backbone, every
trainable tensor moves and every frozen one stays, and it learns on digits. (Merging, over
``METHODS`` as well, is in test_merge.py.) Adding a method costs one row here; its own test file
holds only what is specific to its math.

The checks are functions of a builder and a row (``check_*``), so a method that is not in the
registry runs through them too: :class:`ToyLowRank` below, written as a new contributor would
(a plain Delta with ``forward`` and ``delta_weight``, no batched plan), registered only here."""
import inspect
import math
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import peft_vit
from conftest import CONFIGS, TINY_JAX, TINY_MODEL, VIT_B16, build, digits_accuracy, train_steps
from peft_vit.methods import METHODS
from peft_vit.methods.base import Delta, Method, adapt_linears, register_method

FULL = 85_798_656  # the ViT-B/16 backbone without its head
HEAD = 768 * 100 + 100  # VIT_B16's 100-class head


class Row(NamedTuple):
    count: int  # trainable parameters of ViT-B/16 without the head (README's method table)
    identity: bool  # at initialisation the model computes exactly the backbone's outputs
    # digits_accuracy settings under which it must beat 0.30 (chance 0.10; a linear probe of these
    # random backbones reaches 0.15 / 0.24); None for the probe itself
    digits: Optional[dict] = dict(model=TINY_MODEL)


ROWS = {
    "linear": Row(0, True, digits=None),
    "full": Row(FULL, True, digits=dict(model=TINY_JAX, epochs=4, lr=1e-3)),
    "householder": Row(184_320, True),
    "lora": Row(294_912, True),
    "adapter": Row(156_768, False, digits=dict(model=TINY_JAX, epochs=5, lr=1e-2)),  # xavier init
    "rlrr": Row(288_768, False, digits=dict(model=TINY_JAX, epochs=4, lr=1e-2)),  # the official init
    # dropout 0.5 on the whole update matrix (one mask per step) slows it: 8 epochs at 5e-3 reach 0.29
    "kadaptation": Row(50_176, True, digits=dict(model=TINY_MODEL, epochs=12, lr=1e-2)),
    # rank 32: U, V 768·32 each, P 32·144, core 32³; at scale 10 the official lr 1e-3 (5e-3 diverges)
    "fact_tk": Row(86_528, True, digits=dict(model=TINY_JAX, epochs=8, lr=1e-3)),
    "vera": Row(24_576, True),  # q, v of 12 blocks: 2 · 12 · (768 + 256)
    "adaptformer": Row(1_189_632, True),  # bottleneck 64; zero up-projection
    "dora": Row(322_560, True),  # LoRA's 294,912 + 12 · 2,304 magnitudes
    "vpt_deep": Row(92_160, False, digits=dict(model=TINY_JAX, epochs=5, lr=1e-2)),  # official uniform init
    # the official init gamma ~ N(1, 0.02), beta ~ N(0, 0.02); 0.48 (0.09 on the std-0.02 TINY_MODEL)
    "ssf": Row(205_824, False, digits=dict(model=TINY_JAX, epochs=4, lr=5e-3)),
    "bitfit": Row(102_912, True, digits=dict(model=TINY_JAX, epochs=4, lr=5e-3)),  # 0.46 (0.11 on TINY_MODEL)
    "hra": Row(184_320, True),  # q, v of 12 blocks, 10 reflections of 768: 24 · 768 · 10 (HTA's budget)
    "oft": Row(138_240, True),  # q, v of 12 blocks, 768/16 = 48 blocks of 16·15/2 = 120: 24 · 48 · 120
    "boft": Row(147_456, True),  # q, v of 12 blocks: 24 · (2 factors · 96 blocks · 8·7/2 + 768 scales)
    # 12 blocks · 2 LayerNorms · (768 + 768) + the final norm's 1,536
    "ln_tune": Row(38_400, True, digits=dict(model=TINY_JAX, epochs=4, lr=5e-3)),
    # bitfit's 102,912 biases + LayerNorm weights 12 · 2 · 768 + 768 = 19,200 + gamma 12 · 2 · 768 = 18,432
    "difffit": Row(140_544, True, digits=dict(model=TINY_JAX, epochs=4, lr=5e-3)),
    # 24 adapters · (W_A 8·768 + b_A 8 + grouped W_B 768·4 + b_B 768 = 9,992)
    "repadapter": Row(239_808, True),
    # 24 bypasses · (down 768·8 + 8 + conv 8·8·9 + 8 + up 8·768 + 768 = 13,648); zero up-projection
    "convpass": Row(327_552, True, digits=dict(model=TINY_JAX, epochs=5, lr=1e-2)),  # 0.76 (0.29 on TINY_MODEL)
    # rank 8: U 768·8 + V 768·8 + 12 blocks · (q, k, v, o 4·8² + fc1 4·8² + fc2 4·8²) = 12,288 + 9,216
    "fact_tt": Row(21_504, True, digits=dict(model=TINY_JAX, epochs=8, lr=1e-2)),  # 0.55 (at scale 1)
}
# what a method adds to the model (default: its whole count); the others train backbone tensors too
ADDED = {"full": 0, "bitfit": 0, "ln_tune": 0, "difffit": 18_432}
# variants whose trainable set differs from the default's (other blocks, other modules)
VARIANTS = [(m, {}) for m in ROWS] + [("lora", dict(targets=["q", "v"])), ("adapter", dict(placement="houlsby")),
                                      ("dora", dict(targets=["q", "v"])), ("vpt_deep", dict(deep=False)),
                                      ("repadapter", dict(placement="attn")), ("convpass", dict(placement="attn"))]


def _id(v):
    return v if isinstance(v, str) else "-".join(f"{k}={v}" for k, v in v.items()) or "default"


def test_rows_cover_the_registry():
    assert set(ROWS) == set(METHODS), "add a row for each registered method (and only for those)"


@pytest.mark.parametrize("method", ROWS)
def test_config_keys_are_the_constructor_parameters(method):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "method" / f"{method}.yaml"))
    assert cfg.pop("name") == method
    sig = inspect.signature(METHODS[method].__init__).parameters
    assert set(cfg) == set(sig) - {"self"}
    for k, v in cfg.items():
        default = sig[k].default
        assert (list(default) if isinstance(default, tuple) else default) == v, k


Builder = Callable[..., nn.Module]  # (model config, **method overrides) -> the adapted model


def builder(method: str) -> Builder:
    """A registered method, from configs/method/<method>.yaml (conftest.build)."""
    return lambda model=TINY_MODEL, **kwargs: build(method, model, **kwargs)


def check_vit_b16_count(make: Builder, row: Row, added: Optional[int] = None) -> None:
    c = peft_vit.count_parameters(make(VIT_B16))
    assert c["trainable_params_no_head"] == row.count
    assert c["trainable_params"] == row.count + HEAD
    # full, bitfit and ln_tune train the backbone's own tensors: they add none (difffit adds only gamma)
    assert c["total_params"] == FULL + HEAD + (row.count if added is None else added)


def check_identity_at_start(make: Builder, row: Row, x: torch.Tensor) -> None:
    plain, model = build("linear").eval(), make().eval()  # same seed: the same backbone
    with torch.no_grad():
        out, ref = model(x), plain(x)
    if row.identity:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(out, ref, atol=1e-3)


def check_trainable_tensors_move_and_frozen_stay(make: Builder, **kwargs) -> None:
    model = make(**kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    train_steps(model, steps=3)  # a factor that starts at 0 gives its partner a gradient from step 2
    params = dict(model.named_parameters())
    assert not [n for n in trainable if torch.equal(params[n], before[n])], "trainable but unchanged"
    assert not [n for n in set(params) - trainable if not torch.equal(params[n], before[n])], "frozen but changed"


def check_learns_digits(make: Builder, row: Row) -> None:
    settings = dict(row.digits)
    acc = digits_accuracy(make(settings.pop("model")), **settings)
    assert acc > 0.30, acc


@pytest.mark.parametrize("method", ROWS)
def test_vit_b16_count(method):
    check_vit_b16_count(builder(method), ROWS[method], added=ADDED.get(method))


@pytest.mark.parametrize("method", ROWS)
def test_identity_at_start(method, tiny_input):
    check_identity_at_start(builder(method), ROWS[method], tiny_input)


@pytest.mark.parametrize("method,kwargs", VARIANTS, ids=_id)
def test_every_trainable_tensor_moves_and_every_frozen_one_stays(method, kwargs):
    check_trainable_tensors_move_and_frozen_stay(builder(method), **kwargs)


@pytest.mark.parametrize("method", [m for m, r in ROWS.items() if r.digits is not None])
def test_learns_digits(method):
    check_learns_digits(builder(method), ROWS[method])


# --------------------------------------------------------------------------- a new contributor's method

class ToyLowRankDelta(Delta):
    """ΔW = up · down (LoRA's form), with nothing but the math: no batched plan, no packing."""

    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x, weight, bias):
        return (x @ self.down.t().to(x.dtype)) @ self.up.t().to(x.dtype)

    def delta_weight(self, weight):
        return self.up @ self.down


class ToyLowRank(Method):
    def __init__(self, rank: int = 2, targets=("q", "v")):
        self.rank, self.targets = int(rank), list(targets)

    def inject(self, model: nn.Module) -> None:
        adapt_linears(model, self.targets, lambda site: ToyLowRankDelta(site.out_features, site.in_features, self.rank))


TOY = "toy_lowrank"
TOY_ROW = Row(12 * 2 * 2 * (768 + 768), True)  # q and v blocks of 12 layers, rank 2: 73,728


@pytest.fixture
def toy() -> Builder:
    """ToyLowRank registered for one test only (test_rows_cover_the_registry and the other files
    see the registry without it)."""
    register_method(TOY)(ToyLowRank)

    def make(model=TINY_MODEL, **kwargs):
        torch.manual_seed(0)
        return peft_vit.build_model(OmegaConf.create({"model": model, "method": {"name": TOY, **kwargs}}))
    yield make
    del METHODS[TOY]


def test_new_contributors_method_keeps_the_contract(toy, tiny_input):
    assert ToyLowRank.batched is None and not [n for n in dir(ToyLowRankDelta) if "batch" in n or "pack" in n]
    check_vit_b16_count(toy, TOY_ROW)
    check_identity_at_start(toy, TOY_ROW, tiny_input)
    check_trainable_tensors_move_and_frozen_stay(toy)
    check_trainable_tensors_move_and_frozen_stay(toy, targets=["qkv", "o"])
    check_learns_digits(toy, TOY_ROW)
    model = train_steps(toy(), tiny_input, steps=3)  # and it merges exactly into a plain ViT
    with torch.no_grad():
        ref = model(tiny_input)
        peft_vit.merge(model)
        torch.testing.assert_close(model(tiny_input), ref, atol=1e-5, rtol=1e-5)
    assert type(model).__name__ == "VisionTransformer" and not any(isinstance(m, ToyLowRankDelta) for m in model.modules())


def test_make_delta_gets_a_site_with_the_frozen_block():
    """adapt_linears hands make_delta one Site per block: name, block, layer and views of the
    frozen weight/bias rows it adapts (what a DoRA-like method needs)."""
    import timm

    from peft_vit.methods.base import Delta, Site, adapt_linears

    model = timm.create_model(TINY_MODEL["name"], pretrained=False, img_size=32, num_classes=10,
                              **TINY_MODEL["overrides"])
    qkv = model.blocks[1].attn.qkv
    dim = qkv.in_features
    seen = []

    def make(site: Site) -> Delta:
        seen.append(site)
        return Delta()

    adapt_linears(model, ["v", "o"], make)
    v = next(s for s in seen if s.block == "v" and s.layer == 1)
    assert v.name == "blocks.1.attn.qkv" and (v.out_features, v.in_features) == (dim, dim)
    assert torch.equal(v.weight, qkv.weight[2 * dim:]) and torch.equal(v.bias, qkv.bias[2 * dim:])
    assert v.weight.data_ptr() == qkv.weight[2 * dim:].data_ptr()  # a view, not a copy
    o = next(s for s in seen if s.name == "blocks.0.attn.proj")
    assert o.block == "all" and o.layer == 0 and o.weight.shape == (dim, dim)
