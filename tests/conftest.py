"""Shared test fixtures. Tests never touch the network: the hub is offline and models are
randomly initialised (tiny ViTs for behaviour, ViT-B/16 without weights for exact counts)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# A tiny ViT with D = 64 (divisible by KAdaptation's 32) for behaviour tests
TINY_MODEL = dict(name="vit_tiny_patch16_224", pretrained=False, checkpoint=None, num_classes=10,
                  drop_path_rate=0.0, img_size=32,
                  overrides=dict(patch_size=4, depth=2, embed_dim=64, num_heads=4))
VIT_B16 = dict(name="vit_base_patch16_224.orig_in21k", pretrained=False, checkpoint=None, num_classes=100,
               drop_path_rate=0.0, img_size=224, overrides={})


def compose(*overrides: str):
    """The composed Hydra config, as `python train.py <overrides>` would see it."""
    from hydra import compose as hcompose, initialize_config_dir

    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    if cfg.hydra.runtime.cwd is None:
        cfg.hydra.runtime.cwd = str(REPO)
    HydraConfig.instance().set_config(cfg)  # as during a run: ${hydra:...} interpolations resolve
    return cfg


def method_cfg(name: str, **kwargs):
    """configs/method/<name>.yaml with keyword overrides."""
    cfg = OmegaConf.load(CONFIGS / "method" / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, kwargs)
    return cfg


def build(method: str, model: dict = TINY_MODEL, **method_kwargs):
    import peft_vit

    torch.manual_seed(0)
    cfg = OmegaConf.create({"model": model, "method": method_cfg(method, **method_kwargs)})
    return peft_vit.build_model(cfg)


@pytest.fixture
def tiny_input():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)
