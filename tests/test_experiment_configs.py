"""The experiment presets of configs/experiment/ compose and carry the values of docs/REFERENCE.md §1.1 and §4."""
import pytest
from omegaconf import OmegaConf

from conftest import CONFIGS, compose

PRESETS = ["vtab_noah", "vtab_rlrr", "vtab_hta", "vtab_honest", "fgvc_rlrr", "fgvc_hta", "vtab_fact", "vtab_ssf",
           "vtab_vpt"]

# RLRR's per-task lr / wd / drop / flip (official configs, github.com/zstarN70/RLRR; docs/REFERENCE.md §4)
RLRR_VTAB_RECIPE = """caltech101 1e-3/5e-5/.1/no · cifar 3e-3/5e-5/.1/no · dtd 2e-3/5e-5/.1/yes ·
  flowers 3e-3/5e-2/.3/no · pets 1e-3/5e-5/.1/yes · svhn 5e-3/5e-5/.3/no ·
  sun397 1e-3/5e-5/.1/no · camelyon 3e-3/5e-2/.3/yes · eurosat 1e-3/5e-5/.1/yes ·
  resisc45 3e-3/5e-5/0/no · retinopathy 5e-3/5e-5/.1/yes · clevr_count 5e-3/5e-5/.5/yes ·
  clevr_dist 1e-2/5e-5/.2/yes · dmlab 5e-3/5e-5/.3/yes · kitti 3e-3/5e-2/.3/yes ·
  dsprites_loc 1e-2/5e-5/.1/no · dsprites_ori 5e-3/5e-5/.1/no ·
  smallnorb_azi 5e-3/5e-2/.3/no · smallnorb_ele 1e-3/5e-5/.3/yes."""


def spec_rlrr():
    out = {}
    for item in RLRR_VTAB_RECIPE.replace("\n", " ").rstrip(".").split("·"):
        name, vals = item.split()
        lr, wd, drop, flip = vals.split("/")
        out[name] = (float(lr), float(wd), float(drop), flip == "yes")
    return out


def vtab_task_names():
    from peft_vit.report import vtab_tasks

    return list(vtab_tasks())


def train_flip(dataset):
    """The horizontal flip the VTAB data code applies to a dataset config's training set
    (``flip: rlrr`` takes the task registry's)."""
    from peft_vit.data.vtab import get_task, resolve_flip

    return resolve_flip(dataset["flip"], get_task(dataset["task"]).flip)


def job(cfg):
    """The job config, every interpolation resolved (what the loop records)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_resolves(preset):
    text = (CONFIGS / "experiment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = compose(f"experiment={preset}")
    j = job(cfg)
    assert j["protocol"] in ("tune", "final") and j["logger"]["group"] == preset
    assert cfg.hydra.runtime.choices.experiment == preset


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sets_only_known_keys(preset):
    """A typo (trainer.eval_evry) would silently add a key nobody reads: every key a preset sets
    must exist in the composed default config, except the few documented new ones."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "experiment" / f"{preset}.yaml"))
    preset_cfg = compose(f"experiment={preset}")
    base = job(compose(f"dataset={preset_cfg.hydra.runtime.choices.dataset}"))
    base["method"] = job(compose(f"method={preset_cfg.method.name}"))["method"]
    base["optim"] = job(compose(f"optim={preset_cfg.hydra.runtime.choices.optim}"))["optim"]
    new_ok = {"optim.cooldown_epochs", "model.zero_head", "optim.lr_step"}

    def walk(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                yield from walk(v, key + ".")
            else:
                yield key

    tables = [k for k in raw if k.endswith("_hparams")]  # the per-task tables the keys read
    for key in walk({k: v for k, v in raw.items() if k not in ("defaults", "hydra", *tables)}):
        node = base
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) and part in node else KeyError
        assert node is not KeyError or key in new_ok, f"{preset}: {key} is not a key of the composed config"


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_vtab_noah(method):
    c = compose("experiment=vtab_noah", f"method={method}")
    assert c.method.name == method and c.protocol == "final" and c.seed == 0
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_epochs, c.optim.warmup_lr, c.optim.min_lr) == \
        (1e-3, 1e-4, 10, 1e-6, 1e-5)
    assert (c.trainer.batch_size, c.trainer.epochs, c.trainer.eval_every) == (64, 100, 1)
    assert c.model.drop_path_rate == 0.1 and c.dataset.normalize == "imagenet" and c.dataset.flip is False
    assert c.optim.name == "adamw"
    assert compose("experiment=vtab_noah").method.name == "lora"  # the preset's default method
    assert c.method.init == "noah"  # NOAH as its code runs: every Linear re-initialised
    assert compose(f"method={method}").method.init == "paper"  # the method's own default


@pytest.mark.parametrize("preset", ["vtab_rlrr", "fgvc_rlrr"])
def test_rlrr_presets_zero_the_head_and_use_the_official_decay_groups(preset):
    c = compose(f"experiment={preset}", "dataset=vtab/dtd" if preset == "vtab_rlrr" else "dataset=fgvc/cub")
    assert c.model.zero_head is True and c.method.decay_groups == "official"
    assert "zero_head" not in compose("method=rlrr").model  # the plain model keeps timm's head init


def test_vtab_rlrr_dtd():
    """`python train.py experiment=vtab_rlrr dataset=vtab/dtd`: dtd's row of docs/REFERENCE.md §4."""
    c = compose("experiment=vtab_rlrr", "dataset=vtab/dtd")
    assert c.dataset.task == "dtd"
    assert c.optim.lr == 2e-3 and c.optim.weight_decay == 5e-5 and train_flip(c.dataset) is True
    assert c.method.name == "rlrr" and c.method.drop == 0.1 and c.model.drop_path_rate == 0.1


@pytest.mark.parametrize("task", sorted(spec_rlrr()))
def test_vtab_rlrr_every_task(task):
    lr, wd, drop, flip = spec_rlrr()[task]
    c = compose("experiment=vtab_rlrr", f"dataset=vtab/{task}")
    j = job(c)
    assert j["optim"]["lr"] == lr and j["optim"]["weight_decay"] == wd
    assert j["method"]["drop"] == drop and j["model"]["drop_path_rate"] == drop and train_flip(j["dataset"]) is flip
    assert j["dataset"]["normalize"] == "half"
    assert (j["trainer"]["batch_size"], j["trainer"]["epochs"], j["optim"]["cooldown_epochs"]) == (32, 110, 10)
    assert (j["optim"]["warmup_epochs"], j["optim"]["warmup_lr"], j["optim"]["min_lr"]) == (10, 1e-7, 1e-8)


def test_vtab_rlrr_table_covers_the_registry():
    table = OmegaConf.load(CONFIGS / "experiment" / "vtab_rlrr.yaml").rlrr_hparams.vtab
    assert list(table) == vtab_task_names() and set(table) == set(spec_rlrr())


def test_vtab_rlrr_command_line_wins():
    c = compose("experiment=vtab_rlrr", "dataset.task=dtd", "optim.lr=0.01", "dataset.flip=false")
    assert c.optim.lr == 0.01 and train_flip(c.dataset) is False and c.optim.weight_decay == 5e-5


def test_vtab_rlrr_other_method():
    """Another method gets the shared recipe (drop path per task) and none of RLRR's own keys."""
    c = compose("experiment=vtab_rlrr", "method=householder", "dataset.task=svhn")
    assert c.method.name == "householder" and "drop" not in c.method and c.model.drop_path_rate == 0.3
    import peft_vit

    job(c)
    peft_vit.get_method(c.method.name, **{k: v for k, v in OmegaConf.to_container(c.method).items() if k != "name"})


def test_vtab_rlrr_rejects_a_dataset_without_a_row():
    c = compose("experiment=vtab_rlrr", "dataset=demo/digits")
    with pytest.raises(Exception):
        job(c)


HTA_LR = [0.2, 0.1, 0.05, 0.01, 0.005, 0.001, 0.0001]   # HTA paper's grid (docs/REFERENCE.md §1.1)
HTA_WD = [0.05, 0.01, 0.005, 0.001, 0.0]


def grid(cfg, key):
    return [float(x) for x in str(cfg.hydra.sweeper.params[key]).split(",")]


def test_vtab_hta():
    c = compose("experiment=vtab_hta", "dataset.task=dtd")
    assert c.method.name == "householder" and c.protocol == "tune"
    assert grid(c, "optim.lr") == HTA_LR and grid(c, "optim.weight_decay") == HTA_WD
    assert (c.trainer.epochs, c.optim.warmup_epochs, c.optim.name) == (100, 10, "adamw")
    assert c.optim.lr in HTA_LR and c.optim.weight_decay in HTA_WD
    assert c.trainer.eval_every == 1


def test_fgvc_hta():
    """HTA's FGVC recipe beside fgvc_rlrr: random-resized-crop + flip, its lr × wd grid."""
    c = compose("experiment=fgvc_hta", "dataset=fgvc/dogs")
    assert c.method.name == "householder" and c.protocol == "tune" and c.dataset.task == "dogs"
    assert c.dataset.train_crop == "random_resized" and c.dataset.flip is True
    assert grid(c, "optim.lr") == HTA_LR and grid(c, "optim.weight_decay") == HTA_WD
    assert (c.trainer.epochs, c.optim.warmup_epochs, c.optim.name, c.trainer.eval_every) == (100, 10, "adamw", 1)
    assert compose("experiment=fgvc_hta").dataset.name == "fgvc"


def test_vtab_honest():
    c = compose("experiment=vtab_honest", "method=householder")
    assert c.protocol == "tune" and c.method.name == "householder"
    assert len(grid(c, "optim.lr")) * len(grid(c, "optim.weight_decay")) == 15
    assert c.optim.lr in grid(c, "optim.lr") and c.optim.weight_decay in grid(c, "optim.weight_decay")
    assert c.dataset.normalize == "imagenet" and c.trainer.epochs == 100


def _sweep_jobs(cfg, cli):
    """The jobs Hydra's basic sweeper makes from the preset's grid and a command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = dict(cfg.hydra.sweeper.params or {})
    conf = [f"{k}={v}" for k, v in params.items()] + list(cli)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(conf), None)
    return [job for batch in batches for job in batch]


@pytest.mark.parametrize("preset,n", [("vtab_honest", 15), ("vtab_hta", 35)])
def test_grid_then_final_on_the_command_line(preset, n):
    c = compose(f"experiment={preset}")
    assert len(_sweep_jobs(c, [])) == n
    # the final jobs written by select_best: the command line's lr / wd replace the grid
    final = ["optim.lr=0.001", "optim.weight_decay=0.0001", "protocol=final", "seed=0,1,2"]
    jobs = _sweep_jobs(c, final)
    assert len(jobs) == 3
    for i, j in enumerate(jobs):
        assert sorted(j) == sorted(["optim.lr=0.001", "optim.weight_decay=0.0001", "protocol=final", f"seed={i}"])
        cj = compose(f"experiment={preset}", *j)
        assert cj.protocol == "final" and cj.optim.lr == 1e-3 and cj.seed == i


def test_vtab_rlrr_flips_come_from_the_task_registry_only():
    preset = OmegaConf.load(CONFIGS / "experiment" / "vtab_rlrr.yaml")
    assert preset.dataset.flip == "rlrr" and not [t for t, v in preset.rlrr_hparams.vtab.items() if "flip" in v]


# RLRR's FGVC recipe (github.com/zstarN70/RLRR; docs/REFERENCE.md §4): batch 32, weight decay 0.05,
# 50 epochs, and per dataset (lr, drop):
RLRR_FGVC_RECIPE = {"cub": (3e-3, 0.1), "nabirds": (5e-4, 0.3), "flowers": (3e-3, 0.2), "dogs": (1e-4, 0.0),
                    "cars": (3e-3, 0.2)}


@pytest.mark.parametrize("name", sorted(RLRR_FGVC_RECIPE))
def test_fgvc_rlrr_every_dataset(name):
    lr, drop = RLRR_FGVC_RECIPE[name]
    j = job(compose("experiment=fgvc_rlrr", f"dataset=fgvc/{name}"))
    assert j["dataset"]["task"] == name and j["method"]["name"] == "rlrr" and j["protocol"] == "final"
    assert (j["optim"]["lr"], j["optim"]["weight_decay"]) == (lr, 0.05)
    assert j["method"]["drop"] == drop and j["model"]["drop_path_rate"] == drop
    assert (j["trainer"]["batch_size"], j["trainer"]["epochs"], j["trainer"]["eval_every"]) == (32, 60, 1)
    d = j["dataset"]
    assert (d["normalize"], d["train_crop"], d["resize"], d["flip"]) == ("half", "resize_crop", "square", True)
    o = j["optim"]
    if name in ("cub", "dogs"):  # RLRR's code: CosineAnnealingWarmRestarts(T_0=5, eta_min=0), no warm-up
        assert (o["restart_epochs"], o["warmup_epochs"], o["min_lr"], o["cooldown_epochs"]) == (5, 0, 0.0, 0)
    else:                        # 50 epochs of warm-up + cosine, then 10 of cool-down
        assert (o["restart_epochs"], o["warmup_epochs"], o["min_lr"], o["cooldown_epochs"]) == (None, 10, 1e-8, 10)
        assert o["warmup_lr"] == 1e-7 and j["trainer"]["epochs"] - o["cooldown_epochs"] == 50


def test_fgvc_rlrr_table_covers_the_registry():
    from peft_vit.data.fgvc import DATASETS

    table = OmegaConf.load(CONFIGS / "experiment" / "fgvc_rlrr.yaml").rlrr_fgvc_hparams
    assert set(table) == set(DATASETS) == set(RLRR_FGVC_RECIPE)


def test_fgvc_rlrr_schedule_builds_for_every_dataset():
    import torch

    from peft_vit.engine.optim import build_scheduler

    for name in RLRR_FGVC_RECIPE:
        c = compose("experiment=fgvc_rlrr", f"dataset=fgvc/{name}")
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=c.optim.lr)
        build_scheduler(opt, c.optim, c.trainer.epochs, steps_per_epoch=3)


def test_fgvc_rlrr_rejects_a_vtab_dataset():
    with pytest.raises(Exception):
        job(compose("experiment=fgvc_rlrr", "dataset=vtab/cifar"))


def test_vtab_noah_adaptformer_is_the_reprinted_016m_setting():
    """AdaptFormer's VTAB-1k row (paper_results.yaml) is the 0.16M setting: bottleneck 8, its own init."""
    c = compose("experiment=vtab_noah", "method=adaptformer")
    assert (c.method.bottleneck, c.method.init) == (8, "lora")
    assert compose("method=adaptformer").method.bottleneck == 64  # the method's own default stays
    from peft_vit.report.tables import load_paper

    row = next(r for r in load_paper()["vtab"] if r["method"] == "adaptformer")
    assert row["recipe"] == "vtab_noah" and row["setting"] == "method.bottleneck=8"


# FacT-TK's per-task (rank, scale): FacT/configs/tk/<task>.yaml of JieShibo/PETL-ViT (docs/REFERENCE.md §4)
FACT_TK = """cifar 32/0.1 · caltech101 32/10 · dtd 16/0.01 · flowers 32/1 · pets 16/10 · svhn 32/100 ·
  sun397 16/1 · camelyon 32/10 · eurosat 32/100 · resisc45 32/10 · retinopathy 16/1 · clevr_count 32/10 ·
  clevr_dist 16/10 · dmlab 32/10 · kitti 32/10 · dsprites_loc 32/100 · dsprites_ori 32/1 ·
  smallnorb_azi 32/100 · smallnorb_ele 16/10"""
# SSF's per-task (lr, weight decay, drop path): train_scripts/vit/vtab/<task>/train_ssf.sh of dongzelian/SSF
SSF = """cifar 5e-3/5e-5/0 · caltech101 1e-3/5e-2/.1 · dtd 5e-3/5e-5/0 · flowers 5e-3/5e-5/0 · pets 5e-3/5e-5/0 ·
  svhn 1e-2/5e-5/0 · sun397 5e-3/5e-5/0 · camelyon 5e-3/5e-5/0 · eurosat 3e-3/5e-2/.2 · resisc45 2e-3/5e-5/.1 ·
  retinopathy 5e-3/5e-5/.2 · clevr_count 2e-3/5e-2/.1 · clevr_dist 5e-2/5e-2/.1 · dmlab 5e-3/5e-5/.1 ·
  kitti 1e-2/5e-5/0 · dsprites_loc 1e-2/5e-5/0 · dsprites_ori 5e-3/5e-5/.2 · smallnorb_azi 2e-2/5e-5/.1 ·
  smallnorb_ele 5e-3/5e-2/.2"""


def spec(text):
    return {name: tuple(float(v) for v in vals.split("/"))
            for name, vals in (item.split() for item in text.replace("\n", " ").split("·"))}


def test_fact_and_ssf_tables_cover_the_registry():
    for preset, table, text in (("vtab_fact", "fact_hparams", FACT_TK), ("vtab_ssf", "ssf_hparams", SSF)):
        rows = OmegaConf.load(CONFIGS / "experiment" / f"{preset}.yaml")[table].vtab
        assert list(rows) == vtab_task_names() and set(rows) == set(spec(text))


@pytest.mark.parametrize("task", vtab_task_names())
def test_vtab_fact_every_task(task):
    rank, scale = spec(FACT_TK)[task]
    j = job(compose("experiment=vtab_fact", f"dataset=vtab/{task}"))
    assert j["method"]["name"] == "fact_tk" and (j["method"]["rank"], j["method"]["scale"]) == (rank, scale)
    o, t = j["optim"], j["trainer"]
    assert (o["name"], o["lr"], o["weight_decay"], o["warmup_epochs"], o["warmup_lr"], o["min_lr"]) == \
        ("adamw", 1e-3, 1e-4, 10, 1e-6, 1e-5)
    assert (o["cooldown_epochs"], o["lr_step"]) == (0, "epoch")
    assert (t["epochs"], t["batch_size"], t["eval_every"]) == (100, 64, 10)
    assert (j["model"]["drop_path_rate"], j["dataset"]["normalize"], j["dataset"]["flip"]) == (0.1, "imagenet", False)
    assert j["protocol"] == "final"


@pytest.mark.parametrize("task", vtab_task_names())
def test_vtab_ssf_every_task(task):
    lr, wd, dp = spec(SSF)[task]
    j = job(compose("experiment=vtab_ssf", f"dataset=vtab/{task}"))
    o, t = j["optim"], j["trainer"]
    assert j["method"] == job(compose("method=ssf"))["method"]  # SSF's own defaults: no per-task method value
    assert (o["lr"], o["weight_decay"], j["model"]["drop_path_rate"]) == (lr, wd, dp)
    assert (o["warmup_epochs"], o["warmup_lr"], o["min_lr"], o["cooldown_epochs"], o["lr_step"]) == \
        (10, 1e-7, 1e-8, 10, "epoch")
    assert (t["epochs"], t["batch_size"], t["label_smoothing"], t["eval_every"]) == (110, 64, 0.0, 1)  # 32 × 2 GPUs
    assert (j["dataset"]["normalize"], j["dataset"]["flip"]) == ("half", False)


# VPT-deep: the three tasks KMnP/vpt's demo.ipynb gives (prompts, batch, base_lr, weight decay)
VPT = {"dmlab": (100, 64, 0.25, 1e-3), "sun397": (5, 128, 12.5, 1e-4), "eurosat": (100, 64, 0.25, 1e-3)}


@pytest.mark.parametrize("task", sorted(VPT))
def test_vtab_vpt_official_tasks(task):
    tokens, batch, base_lr, wd = VPT[task]
    j = job(compose("experiment=vtab_vpt", f"dataset=vtab/{task}"))
    o = j["optim"]
    assert (j["method"]["name"], j["method"]["num_tokens"], j["method"]["dropout"]) == ("vpt_deep", tokens, 0.1)
    assert (o["name"], o["momentum"], o["lr"], o["weight_decay"]) == ("sgd", 0.9, base_lr / 256 * batch, wd)
    assert (o["warmup_epochs"], o["warmup_lr"], o["min_lr"], o["lr_step"]) == (10, 0.0, 0.0, "epoch")
    assert (j["trainer"]["batch_size"], j["trainer"]["epochs"]) == (batch, 100)
    assert (j["dataset"]["normalize"], j["dataset"]["interpolation"]) == ("imagenet", "bilinear")


def test_vtab_vpt_holds_only_the_sourced_tasks():
    rows = OmegaConf.load(CONFIGS / "experiment" / "vtab_vpt.yaml").vpt_hparams.vtab
    assert set(rows) == set(VPT)
    c = compose("experiment=vtab_vpt", "dataset=vtab/cifar", "method.num_tokens=50", "optim.lr=0.1",
                "optim.weight_decay=0.001", "trainer.batch_size=64")
    assert job(c)["method"]["num_tokens"] == 50  # the command line still wins (and supplies a task's values)


def _lrs(ocfg, epochs=3, steps=4):
    import torch

    from peft_vit.engine.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=ocfg["lr"])
    sched = build_scheduler(opt, OmegaConf.create(ocfg), epochs, steps_per_epoch=steps)
    out = []
    for n in range(1, epochs * steps + 1):
        out.append(opt.param_groups[0]["lr"])
        sched.step_update(n)
    return out


def test_lr_step_epoch_holds_each_epochs_lr():
    base = dict(lr=1.0, warmup_epochs=1, warmup_lr=0.0, min_lr=0.0, cooldown_epochs=0, restart_epochs=None)
    per_step, per_epoch = _lrs(base), _lrs(dict(base, lr_step="epoch"))
    assert per_epoch == [per_step[e * 4] for e in range(3) for _ in range(4)]  # the lr at each epoch's start
    assert per_epoch[:4] == [0.0] * 4 and per_epoch[4] > 0.0 and per_step[1] > 0.0  # warm-up from 0
    with pytest.raises(ValueError, match="optim.lr_step='step'"):
        _lrs(dict(base, lr_step="step"))


def test_sgd_optimizer():
    import torch

    from peft_vit.engine.optim import build_optimizer

    model = torch.nn.Linear(3, 2)
    o = compose("optim=sgd_cosine").optim
    opt = build_optimizer(model, o, torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, o.weight_decay]  # no decay on the bias
