"""Every registered method on a tiny, weightless variant of each backbone family of configs/model/
(DINOv2 with layer scale, CLIP with pre-norm and QuickGELU, MAE with its average-pool head, Swin
with windowed attention over ``layers.S.blocks.N``): it injects and trains, or refuses with
UnsupportedBackboneError naming the method and the family; mergeable methods merge exactly into
the plain timm class. Plus the exact counts of the four real backbones (built on the meta device:
shapes only, no weights, no init cost) and the backbone checks of peft_vit/backbone.py."""
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

import peft_vit
from conftest import CONFIGS, build, compose
from peft_vit.backbone import PretrainedWeightsUnavailable, create_backbone
from peft_vit.data.transforms import normalization
from peft_vit.methods import METHODS, AdaptedLinear, InsertedAfter, PeftModule
from peft_vit.methods.base import InputTap, InsertedParallel, UnsupportedBackboneError, backbone_family

# family -> (configs/model/<file>, tiny overrides on top of the config's own): 2 blocks (Swin: 2
# stages of 2, so shifted windows run), width 64 (Swin 32 -> 64, divisible by KAdaptation's 32)
TINY = {
    # init_values 0.5, not DINOv2's 1e-5: the layer scale is there, but the blocks still matter
    "dinov2": ("dinov2_vitb14", 28, dict(depth=2, embed_dim=64, num_heads=4, init_values=0.5)),
    "clip": ("clip_vitb16", 32, dict(patch_size=8, depth=2, embed_dim=64, num_heads=4)),
    "mae": ("mae_vitb16", 32, dict(patch_size=8, depth=2, embed_dim=64, num_heads=4)),
    "swin": ("swin_b", 32, dict(patch_size=2, window_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4))),
}
# (method, family) pairs that must refuse; every other pair must inject, train (and merge)
REFUSES = {
    ("vpt_deep", "swin"),  # prompt tokens need one global token sequence; Swin attends per window
    ("fact_tk", "swin"),  # one tensor shared by all layers needs one width; Swin's grows per stage
    ("fact_tt", "swin"),  # the same: U, V shared by all layers
    ("convpass", "swin"),  # the 3x3 conv runs on a ViT's prefix tokens + one patch grid; timm's Swin blocks see maps
}
TRIVIAL = {"linear", "full"}  # nothing to fold
WRAPPERS = (PeftModule, AdaptedLinear, InsertedAfter, InsertedParallel, InputTap)
CASES = [(m, f) for f in TINY for m in sorted(METHODS)]


def _config(family: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{TINY[family][0]}.yaml"))


def tiny_model(family: str) -> dict:
    """The family's config with its weights off and the tiny overrides on."""
    cfg = _config(family)
    _, size, small = TINY[family]
    return dict(name=cfg["name"], pretrained=False, checkpoint=None, num_classes=10, drop_path_rate=0.0,
                img_size=size, overrides=dict(cfg.get("overrides") or {}, **small))


def _plain_timm(family: str):
    m = tiny_model(family)
    return timm.create_model(m["name"], pretrained=False, num_classes=10, img_size=m["img_size"], drop_path_rate=0.0,
                             **m["overrides"])


def _batch(family: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = TINY[family][1]
    return torch.randn(2, 3, size, size, generator=g), torch.tensor([3, 7])


def test_every_family_is_what_its_config_says():
    kinds = {f: (backbone_family(_plain_timm(f)), type(_plain_timm(f).get_classifier()).__name__) for f in TINY}
    assert kinds == {f: ("swin" if f == "swin" else "vit", "Linear") for f in TINY}
    dino, clip, mae, swin = (_plain_timm(f) for f in TINY)
    assert all(hasattr(b, "ls1") and hasattr(b, "ls2") for b in dino.blocks)
    assert isinstance(clip.norm_pre, torch.nn.LayerNorm) and type(clip.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert mae.global_pool == "avg" and isinstance(mae.fc_norm, torch.nn.LayerNorm)
    assert isinstance(mae.norm, torch.nn.Identity)
    assert swin.get_classifier() is swin.head.fc and len(peft_vit.methods.base.block_names(swin)) == 4


@pytest.mark.parametrize("family", TINY)
def test_zero_head_zeroes_the_classifier_of_every_family(family):
    head = create_backbone(**tiny_model(family), zero_head=True).get_classifier()  # Swin: head.fc
    assert head.out_features == 10 and not head.weight.any() and not head.bias.any()


@pytest.mark.parametrize("method,family", CASES, ids=[f"{f}-{m}" for m, f in CASES])
def test_method_on_family(method, family):
    """Injects and trains one step (finite loss; the head and every method parameter get a
    gradient), or refuses clearly; a mergeable method then merges exactly into plain timm."""
    if (method, family) in REFUSES:
        with pytest.raises(UnsupportedBackboneError) as err:
            build(method, tiny_model(family))
        assert method in str(err.value) and family in str(err.value).lower()
        return
    model = build(method, tiny_model(family))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    head = {id(p) for p in model.get_classifier().parameters()}
    assert head <= {id(p) for p in trainable.values()}
    x, y = _batch(family)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f"{method} on {family}: no (finite) gradient for {missing[:5]}"
        assert any(p.grad.abs().sum() > 0 for p in trainable.values() if id(p) not in head) or \
            set(map(id, trainable.values())) == head
        opt.step()
    if method in TRIVIAL or not METHODS[method].mergeable:
        return
    model.eval()
    with torch.no_grad():
        ref = model(x)
    peft_vit.merge(model)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    fresh = _plain_timm(family).eval()
    assert type(model) is type(fresh)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    assert not [n for n, m in model.named_modules() if isinstance(m, WRAPPERS)]
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=1e-4, rtol=1e-4)
    # the method's update is in the merged backbone weights (build() seeds 0 before the backbone)
    torch.manual_seed(0)
    before = create_backbone(**tiny_model(family)).state_dict()
    head = next(n for n, m in model.named_modules() if m is model.get_classifier()) + "."
    changed = [k for k, v in model.state_dict().items()
               if not k.startswith(head) and k in before and not torch.equal(v, before[k])]
    assert changed, f"{method} on {family}: merging left every backbone tensor as it was"


# the real backbones without head (configs/model/*.yaml at their own img_size), and LoRA's
# rank-8 qkv count: 32·width per block (A 8×C, B 3C×8); Swin-B's 24 blocks have widths
# 128, 256, 512 (18 blocks), 1024
REAL = {
    "dinov2_vitb14": (86_579_712, 294_912),  # ViT-B/16's + 12 layer-scale pairs, 37×37 patches of 14 px
    "clip_vitb16": (85_799_424, 294_912),  # + norm_pre, no patch-embedding bias
    "mae_vitb16": (85_798_656, 294_912),  # ViT-B/16's: fc_norm replaces the final norm
    "swin_b": (86_743_224, 385_024),
}


@pytest.mark.parametrize("config", REAL)
def test_real_backbone_counts(config):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{config}.yaml"))
    model = dict(name=cfg["name"], pretrained=False, checkpoint=None, num_classes=100, drop_path_rate=0.0,
                 img_size=cfg["img_size"], overrides=cfg.get("overrides") or {})
    backbone, lora = REAL[config]
    with torch.device("meta"):  # shapes only: counts without initialising 86M weights
        full, low = (peft_vit.count_parameters(build(m, model)) for m in ("full", "lora"))
    width = 1024 if config == "swin_b" else 768
    head = width * 100 + 100
    assert full == {"trainable_params": backbone + head, "trainable_params_no_head": backbone,
                    "total_params": backbone + head}
    assert low == {"trainable_params": lora + head, "trainable_params_no_head": lora,
                   "total_params": backbone + head + lora}


@pytest.mark.parametrize("config", REAL)
def test_config_normalisation_is_what_the_weights_expect(config):
    """The config's `normalize` (dataset.normalize's default) is timm's pretrained mean/std."""
    cfg = OmegaConf.load(CONFIGS / "model" / f"{config}.yaml")
    pretrained = timm.models.get_pretrained_cfg(cfg.name)
    assert pretrained is not None and pretrained.hf_hub_id, cfg.name
    mean, std = normalization(cfg.normalize)
    assert mean == pytest.approx(pretrained.mean) and std == pytest.approx(pretrained.std)
    assert compose(f"model={config}", "dataset=vtab/cifar").dataset.normalize == cfg.normalize


@pytest.mark.parametrize("config", REAL)
def test_offline_without_weights_fails_fast_naming_the_fix(config):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{config}.yaml"))
    with pytest.raises(PretrainedWeightsUnavailable, match="model.checkpoint="):
        create_backbone(name=cfg["name"], num_classes=10, pretrained=True, img_size=cfg["img_size"],
                        overrides=cfg.get("overrides") or {})


@pytest.mark.parametrize("family,size,match", [("swin", 28, "multiple of 2·2·2 = 8"),
                                                ("clip", 36, "not a multiple of the patch size 8")])
def test_img_size_that_does_not_tile_is_refused(family, size, match):
    with pytest.raises(ValueError, match=match):
        create_backbone(**dict(tiny_model(family), img_size=size))


def test_swin_b_needs_multiples_of_224():
    cfg = OmegaConf.load(CONFIGS / "model" / "swin_b.yaml")
    with torch.device("meta"), pytest.raises(ValueError, match="224"):
        create_backbone(name=cfg.name, num_classes=10, pretrained=False, img_size=384)


def test_mae_checkpoint_loads_into_the_average_pool_head(tmp_path):
    """MAE's checkpoint has a final ``norm`` and no ``fc_norm``: every other tensor loads, the
    norm is dropped and fc_norm starts as timm's fresh LayerNorm."""
    m = tiny_model("mae")
    saved = {k: v for k, v in m["overrides"].items() if k not in ("global_pool", "fc_norm")}
    torch.manual_seed(3)
    src = timm.create_model(m["name"], pretrained=False, num_classes=0, img_size=m["img_size"], **saved)
    torch.nn.init.normal_(src.norm.weight)
    sd = src.state_dict()
    assert "norm.weight" in sd and "fc_norm.weight" not in sd
    path = tmp_path / "mae.safetensors"
    save_file(sd, str(path))
    model = create_backbone(**dict(m, checkpoint=str(path)))
    got = model.state_dict()
    for k, v in sd.items():
        if not k.startswith("norm."):
            assert torch.equal(got[k], v), k
    assert torch.equal(got["fc_norm.weight"], torch.ones(64)) and torch.equal(got["fc_norm.bias"], torch.zeros(64))
    assert isinstance(model.norm, torch.nn.Identity) and model.global_pool == "avg"
    # a file that has fc_norm (e.g. scripts/export_merged.py's output) loads as it is
    torch.nn.init.normal_(model.fc_norm.weight)
    save_file(model.state_dict(), str(path))
    again = create_backbone(**dict(m, checkpoint=str(path)))
    assert torch.equal(again.fc_norm.weight, model.fc_norm.weight)
    # anything else missing is refused, never left at its random init
    save_file({k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.weight"}, str(path))
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.weight"):
        create_backbone(**dict(m, checkpoint=str(path)))
