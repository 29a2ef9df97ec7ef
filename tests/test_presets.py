"""Every experiment preset with every registered method: it builds with the method's own defaults
(plus the preset's per-(preset, method) file where there is one, configs/experiment_method/), or
it is refused in one line naming the preset and what it covers. Both lists are read from the
registries, so a new preset or method is checked without editing this file."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONFIGS, compose

PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# the tests' tiny ViT, weightless, whatever model a preset picks (the command line wins)
TINY = ["model=vit_tiny_test"]


def methods():
    from peft_vit.methods import METHODS

    return sorted(METHODS)


def job(cfg):
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def own_method(cfg, preset, method):
    """The method's config as the preset must give it: configs/method/<method>.yaml, with only the
    keys of configs/experiment_method/<preset>/<method>.yaml replaced."""
    expected = OmegaConf.to_container(OmegaConf.load(CONFIGS / "method" / f"{method}.yaml"))
    per_method = CONFIGS / "experiment_method" / preset / f"{method}.yaml"
    if per_method.exists():
        for key in OmegaConf.load(per_method).method:
            expected[key] = job(cfg)["method"][key]
    return expected


@pytest.mark.parametrize("preset", PRESETS)
def test_every_method_builds_or_is_refused_in_one_line(preset):
    import peft_vit
    from peft_vit.config import preset_methods, recipe_gap

    covered = preset_methods(preset)
    assert covered, f"{preset}: no method covered"
    outcome = {}
    for method in methods():
        cfg = compose(f"experiment={preset}", f"method={method}", *TINY)
        gap = recipe_gap(cfg, preset)
        if gap is not None:
            # refused: one line naming the preset, the method, and the methods the preset covers
            assert "\n" not in gap and gap.startswith(f"experiment={preset} does not cover method={method}:"), gap
            assert method not in covered and all(m in gap for m in covered), gap
            outcome[method] = "refused"
            continue
        assert job(cfg)["method"] == own_method(cfg, preset, method), f"{preset} changes {method}'s config"
        model = peft_vit.build_model(cfg)
        assert peft_vit.count_parameters(model)["trainable_params"] > 0
        outcome[method] = "built"
    # a method the preset covers is never refused
    assert all(outcome[m] == "built" for m in covered if m in outcome), outcome


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_covers_its_default_method(preset):
    from peft_vit.config import preset_methods

    assert compose(f"experiment={preset}").method.name == preset_methods(preset)[0]


@pytest.mark.parametrize("preset", PRESETS + [None])
def test_preset_values_pass_the_loops_value_checks(preset):
    """What train.py checks before building anything (engine/optim.py VALUE_RULES) accepts every
    preset's own values and the bare defaults (checkpoint_every: null among them)."""
    from peft_vit.config import recipe_gap
    from peft_vit.engine.optim import check_values

    cfg = compose(*([f"experiment={preset}"] if preset else []))
    if recipe_gap(cfg, preset) is None:  # vtab_vpt's default task has no row: refused in one line instead
        check_values(cfg)


def test_per_method_files_belong_to_a_preset_and_a_method():
    """configs/experiment_method/<preset>/<method>.yaml: an existing preset and method, setting only
    keys the method's config has (a typo would otherwise be a bad-config-keys error at run time)."""
    files = sorted((CONFIGS / "experiment_method").glob("*/*.yaml"))
    assert files
    for f in files:
        preset, method = f.parent.name, f.stem
        assert preset in PRESETS and method in methods(), f
        assert f.read_text().startswith("# @package _global_"), f
        raw = OmegaConf.load(f)
        assert set(raw) == {"method"}, f"{f}: sets {set(raw) - {'method'}} (per-method files set method.* only)"
        own = OmegaConf.load(CONFIGS / "method" / f"{method}.yaml")
        assert set(raw.method) <= set(own) - {"name"}, f"{f}: {set(raw.method) - set(own)} not keys of {method}"


def test_no_experiment_no_per_method_file():
    """Without a preset the entry `experiment_method: ${experiment}/${method}` picks nothing."""
    c = compose("method=lora")
    assert c.method.init == "paper" and "experiment_method" not in c


def test_recipe_gap_names_the_task_rows():
    from peft_vit.config import recipe_gap

    gap = recipe_gap(compose("experiment=vtab_vpt", "dataset=vtab/cifar"), "vtab_vpt")
    assert gap == ("experiment=vtab_vpt does not cover dataset=vtab/cifar: vpt_hparams.vtab has entries for "
                   "sun397, eurosat, dmlab only")
    gap = recipe_gap(compose("experiment=vtab_rlrr", "dataset=fgvc/cub"), "vtab_rlrr")
    assert gap == "experiment=vtab_rlrr does not cover dataset=fgvc/cub: rlrr_hparams has entries for vtab only"


def test_recipe_gap_refuses_an_untuned_proxy_method():
    """experiment=proxy reads its lr per method: a method without an entry is refused by name."""
    from omegaconf import open_dict

    from peft_vit.config import recipe_gap

    c = compose("experiment=proxy", "method=lora")
    with open_dict(c):
        del c.proxy_lr["lora"]
    gap = recipe_gap(c, "proxy")
    assert gap.startswith("experiment=proxy does not cover method=lora: proxy_lr has entries for adapter, ")


def test_train_py_stops_with_the_one_line(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "train.py", "experiment=vtab_vpt", "dataset=vtab/cifar", "logger=none",
                        f"paths.output_root={tmp_path}"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("experiment=vtab_vpt does not cover dataset=vtab/cifar:")


def test_paper_rows_name_a_recipe_that_covers_their_method():
    """paper_results.yaml: a row's `recipe` is a preset covering the row's method (scripts can go
    from a paper row to the command that reproduces it)."""
    from peft_vit.config import preset_methods
    from peft_vit.report.tables import load_paper

    paper = load_paper()
    rows = [r for bench in ("vtab", "fgvc") for r in paper[bench] if r.get("recipe")]
    assert {r["method"] for r in rows} >= {"lora", "adapter", "adaptformer", "ssf", "fact_tk", "vpt_deep"}
    for r in rows:
        assert r["recipe"] in PRESETS and r["method"] in preset_methods(r["recipe"]), r["label"]
