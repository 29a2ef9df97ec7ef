"""Backbone: timm ViTs by name, exact ViT-B/16 counts, local weight files, clear offline errors."""
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

import peft_vit
from conftest import TINY_MODEL, VIT_B16, build
from peft_vit.backbone import PretrainedWeightsUnavailable, create_backbone

BACKBONE = 85_798_656


@pytest.mark.parametrize("classes", [100, 2, 397])
def test_vit_b16_counts_linear_and_full(classes):
    model = dict(VIT_B16, num_classes=classes)
    lin = peft_vit.count_parameters(build("linear", model))
    assert lin == {"trainable_params": 769 * classes, "trainable_params_no_head": 0,
                   "total_params": BACKBONE + 769 * classes}
    full = peft_vit.count_parameters(build("full", model))
    assert full == {"trainable_params": BACKBONE + 769 * classes, "trainable_params_no_head": BACKBONE,
                    "total_params": BACKBONE + 769 * classes}


def test_linear_trains_head_only():
    m = build("linear")
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"head.weight", "head.bias"}


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=str(path)):
        create_backbone(**dict(TINY_MODEL, checkpoint=str(path)))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_checkpoint_loads_through_timm(tmp_path, fmt):
    kw = dict(TINY_MODEL)
    torch.manual_seed(3)
    src = timm.create_model(kw["name"], pretrained=False, num_classes=0, img_size=32, **kw["overrides"])
    sd = src.state_dict()
    path = tmp_path / f"w.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
    m = create_backbone(**dict(kw, checkpoint=str(path)))
    for k, v in sd.items():
        assert torch.equal(m.state_dict()[k], v), k
    assert m.get_classifier().out_features == kw["num_classes"]


def test_offline_pretrained_fails_fast_with_instructions():
    t = time.time()
    with pytest.raises(PretrainedWeightsUnavailable, match="model.checkpoint="):
        create_backbone(**dict(VIT_B16, pretrained=True))
    assert time.time() - t < 15
