"""One declaration of the keys that never change a result (``runtime_keys`` in configs/config.yaml):
the config fingerprint, the report's settings and the sweep job dir names all read it, so they
cannot disagree. A key added there is left out by all three."""
from __future__ import annotations

import copy
import shutil

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import CONFIGS, REPO
from peft_vit import fingerprint as fp
from peft_vit.report.collect import Record


def compose_from(config_dir, *overrides):
    """The composed config from ``config_dir``, as ``python train.py -m <overrides>`` gives a job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.runtime.cwd = str(REPO)
    HydraConfig.instance().set_config(cfg)
    return cfg


def three_views(cfg):
    """What each reader makes of a job's config: its fingerprint, the report's settings of its
    record, and its sweep job dir name."""
    job = copy.deepcopy(cfg)
    with open_dict(job):
        job.pop("hydra")  # a run's config, as the loop records it
    run_cfg = OmegaConf.to_container(job, resolve=True)
    record = Record(method="linear", dataset="vtab", task="cifar", protocol="final", seed=0, test_acc=1.0,
                    config=run_cfg)
    return fp.fingerprint(fp.result_config(cfg)), record.settings, str(cfg.hydra.job.override_dirname)


def test_the_three_read_one_list():
    declared = tuple(OmegaConf.load(CONFIGS / "config.yaml").runtime_keys)
    assert fp.RUNTIME_KEYS == declared == fp.read_runtime_keys()
    cfg = compose_from(CONFIGS)
    assert tuple(cfg.hydra.job.config.override_dirname.exclude_keys) == declared
    assert "trainer.compile" in declared and "runtime_keys" in declared  # the list leaves itself out too


@pytest.mark.parametrize("key", ["trainer.compile", "trainer.num_workers", "logger.mode", "skip_done"])
def test_each_declared_key_is_left_out_by_all_three(key):
    value = {"trainer.compile": "false", "trainer.num_workers": "7", "logger.mode": "online", "skip_done": "false"}
    a = three_views(compose_from(CONFIGS, "optim.lr=0.1"))
    b = three_views(compose_from(CONFIGS, "optim.lr=0.1", f"{key}={value[key]}"))
    assert a == b and a[2] == "optim.lr=0.1"


def test_a_new_runtime_key_is_left_out_by_all_three(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    text = (configs / "config.yaml").read_text()
    assert text.count("proxy_lr]") == 1
    (configs / "config.yaml").write_text(text.replace("proxy_lr]", "proxy_lr, trainer.pin_memory]"))
    runs = [("optim.lr=0.1", "+trainer.pin_memory=true"), ("optim.lr=0.1", "+trainer.pin_memory=false")]

    # before it is declared: the key changes the fingerprint, the settings and the dir name
    before = [three_views(compose_from(CONFIGS, *o)) for o in runs]
    assert [before[0][i] != before[1][i] for i in range(3)] == [True, True, True]

    monkeypatch.setattr(fp, "RUNTIME_KEYS", fp.read_runtime_keys(configs))
    assert "trainer.pin_memory" in fp.RUNTIME_KEYS
    after = [three_views(compose_from(configs, *o)) for o in runs]
    assert after[0] == after[1]
    assert after[0][2] == "optim.lr=0.1"
    assert after[0][0] == three_views(compose_from(configs, "optim.lr=0.1"))[0]  # as if never set


def test_runtime_keys_overridden_on_the_command_line_is_refused():
    """The fingerprint reads configs/config.yaml's list; a run whose own list differs (an override)
    would name its sweep dirs by another list than its fingerprint uses."""
    with pytest.raises(ValueError, match="runtime_keys=.*change the list there"):
        fp.result_config(compose_from(CONFIGS, "runtime_keys=[hydra,paths]"))


def test_fingerprints_of_existing_configs_unchanged():
    """Fingerprints computed before the list moved into configs/config.yaml (vit_tiny_test on
    demo/digits, lora and householder): a changed fingerprint would make every earlier result a
    ForeignStateError."""
    want = {"lora": "e40146f026d59c2e", "householder": "a15dba1e8298d180"}
    got = {m: fp.fingerprint(fp.result_config(compose_from(CONFIGS, "model=vit_tiny_test", "dataset=demo/digits",
                                                            f"method={m}", "trainer.compile=false")))
           for m in want}
    assert got == want
