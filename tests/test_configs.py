"""The configs themselves: every option of every group composes, and bad choices get Hydra's
message listing the options."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONFIGS, REPO, compose

GROUPS = ["model", "method", "dataset", "optim", "trainer", "logger", "experiment"]


def options(group):
    root = CONFIGS / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not p.name.startswith("_"))


@pytest.mark.parametrize("group", GROUPS)
def test_group_has_options(group):
    assert options(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option):
    cfg = compose(f"{group}={option}")
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(job, resolve=True)  # every interpolation resolves
    for key in ("model", "method", "dataset", "optim", "trainer", "logger"):
        assert key in cfg
    assert cfg.model.num_classes == cfg.dataset.num_classes
    assert cfg.protocol in ("tune", "final")


@pytest.mark.parametrize("launcher", [p.stem for p in (CONFIGS / "hydra" / "launcher").glob("*.yaml")])
def test_launcher_presets_compose(launcher):
    cfg = compose(f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher is not None


def test_method_configs_match_registry():
    import peft_vit

    names = {OmegaConf.load(p).name for p in (CONFIGS / "method").glob("*.yaml")}
    assert names == set(peft_vit.METHODS), "configs/method and the method registry disagree"
    for p in (CONFIGS / "method").glob("*.yaml"):
        assert OmegaConf.load(p).name == p.stem


def test_defaults():
    cfg = compose()
    assert cfg.model.name == "vit_base_patch16_224.orig_in21k" and cfg.model.pretrained
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
    assert cfg.protocol == "final" and cfg.skip_done is True


def _train(*args, timeout=120):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_cfg_job_prints_composed_config():
    r = _train("method=full", "dataset=demo/digits", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.method.name == "full" and cfg.dataset.task == "digits"


@pytest.mark.parametrize("arg,missing", [("method=nope", "method/nope"), ("dataset=vtab/nope", "dataset/vtab/nope")])
def test_unknown_choice_lists_options(arg, missing):
    r = _train(arg, "--cfg", "job")
    assert r.returncode != 0
    assert f"Could not find '{missing}'" in r.stderr
    assert "Available options" in r.stderr
