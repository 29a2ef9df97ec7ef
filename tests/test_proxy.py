"""The proxy benchmark: generated tasks (deterministic, NOAH's layout), the shipped pretrained
weights through model.checkpoint, and a quick subset on which every PEFT method must beat the
linear probe on the structured tasks (as on VTAB-1k), and full fine-tuning must too."""
import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose

import proxy_benchmark  # scripts/: pytest's pythonpath (pyproject.toml)

from peft_vit.data import proxy  # noqa: E402

WEIGHTS = REPO / "weights" / "proxy_vit.safetensors"
QUICK_TASKS = ("count", "distance")  # the two structured tasks where every method moves most
QUICK_EPOCHS = 3  # the benchmark's recipe at 3 epochs (of 10), protocol tune (fit train800, score
# val200): ~14 methods x 2 tasks in <= 3 minutes on 2 busy cores


def test_tasks_are_deterministic_and_cover_their_classes():
    for task in proxy.TASKS.values():
        x, y = proxy.generate(task, "val200", seed=0)
        assert x.dtype == torch.uint8 and x.shape == (200, 3, proxy.IMG, proxy.IMG)
        assert y.min() >= 0 and y.max() < task.num_classes
        x2, y2 = proxy.generate(task, "val200", seed=0)
        assert torch.equal(x, x2) and torch.equal(y, y2), task.name
        assert not torch.equal(x, proxy.generate(task, "val200", seed=1)[0]), task.name
    _, y = proxy.generate(proxy.TASKS["count"], "test")
    assert torch.bincount(y, minlength=8).min() > 80  # every class present in the 1,000 test images


def test_cells_label_is_not_in_the_colour_statistics():
    """An earlier ``cells`` was solved (98 %) by any backbone, random ones too, from the amount of
    purple in the patch; now the nuclei's shape decides, and a logistic regression on each
    image's per-channel mean and std stays near chance (54 % when written)."""
    from sklearn.linear_model import LogisticRegression

    def stats(x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).numpy()

    task = proxy.TASKS["cells"]
    (xtr, ytr), (xte, yte) = proxy.generate(task, "train800"), proxy.generate(task, "test")
    assert LogisticRegression(max_iter=1000).fit(stats(xtr), ytr.numpy()).score(stats(xte), yte.numpy()) < 0.62


def test_task_written_in_noah_layout_and_read_back(tmp_path):
    from peft_vit.data import build_datasets

    folder = proxy.write_task(proxy.TASKS["orientation"], tmp_path)
    lines = {s: (folder / f"{s}.txt").read_text().splitlines() for s in ("train800", "val200", "train800val200", "test")}
    assert [len(v) for v in lines.values()] == [800, 200, 1000, 1000]
    assert lines["train800val200"] == lines["train800"] + lines["val200"]
    assert lines["test"][0].startswith("images/test/") and (folder / lines["test"][0].split()[0]).is_file()
    cfg = compose("experiment=proxy", "dataset=proxy/orientation", f"paths.data_dir={tmp_path.parent}",
                  f"dataset.root={tmp_path}", "protocol=tune")
    splits = build_datasets(cfg)
    x, y = proxy.generate(proxy.TASKS["orientation"], "val200")
    assert (splits.train_split, splits.eval_split, len(splits.train), len(splits.eval)) == ("train800", "val200", 800, 200)
    assert torch.equal(splits.eval.images, x) and torch.equal(splits.eval.labels, y)  # PNG is lossless
    mtime = (folder / "proxy.json").stat().st_mtime_ns
    assert proxy.write_task(proxy.TASKS["orientation"], tmp_path) == folder  # reused, not rewritten
    assert (folder / "proxy.json").stat().st_mtime_ns == mtime
    stamp = json.loads((folder / "proxy.json").read_text())
    (folder / "proxy.json").write_text(json.dumps({**stamp, "task_version": stamp["task_version"] - 1}))
    proxy.write_task(proxy.TASKS["orientation"], tmp_path)  # another generator version: rewritten
    assert json.loads((folder / "proxy.json").read_text()) == stamp


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="known: digits, textures"):
        proxy.get_task("cifar")


def test_shipped_weights_load_through_model_checkpoint():
    import peft_vit
    from safetensors.torch import load_file

    meta = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert WEIGHTS.stat().st_size <= 20 * 2**20 and "proxy_pretrain.py" in meta["command"]
    cfg = compose("experiment=proxy", "dataset=proxy/count", "method=linear")
    assert Path(cfg.model.checkpoint) == WEIGHTS
    model = peft_vit.build_model(cfg)
    state = model.state_dict()
    shipped = load_file(str(WEIGHTS))
    assert all(torch.equal(state[k], v) for k, v in shipped.items() if not k.startswith("head."))
    assert model.head.out_features == 8


def test_pretraining_runs_its_stages_in_one_command(tmp_path):
    """scripts/proxy_pretrain.py runs the shipped recipe's stages in order (here 2 steps each):
    the 256-class hue stage, then the 32-class shape stage from its weights with a new head."""
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("_proxy_pretrain", REPO / "scripts" / "proxy_pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    out = tmp_path / "vit.safetensors"
    assert pretrain.main(["--stages", "hue:2,shape:2", "--batch-size", "8", "--warmup", "1", "--threads", "1",
                          "--held-out", "64", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [(s["stage"], s["steps"], s["classes"]) for s in meta["stages"]] == [("hue", 2, 256), ("shape", 2, 32)]
    assert load_file(str(out))["head.weight"].shape == (32, 96)
    _, y = proxy.pretrain_batch(torch.Generator().manual_seed(0), 512, "hue")
    assert y.max() < 256 and len(y.unique()) > 200


def test_make_table_renders_proxy_groups(tmp_path):
    """scripts/make_table.py knows the proxy benchmark's tasks and groups from proxy.TASKS: one
    column per task in group order, the group means, the mean, and the trainable parameters."""
    import importlib.util

    import pandas as pd

    acc = {"linear": dict(zip(proxy.TASKS, (10, 20, 60, 40, 30, 14, 16, 20))),
           "lora": dict(zip(proxy.TASKS, (30, 50, 70, 60, 50, 34, 36, 40)))}
    params = {"linear": 0, "lora": 18_432}
    for m, per_task in acc.items():
        for task, a in per_task.items():
            head = 97 * proxy.TASKS[task].num_classes
            rec = {"method": m, "dataset": "proxy", "task": task, "protocol": "final", "seed": 0, "test_acc": a,
                   "trainable_params": params[m] + head, "trainable_params_no_head": params[m],
                   "config": {"method": {"name": m}, "model": {"name": "vit_tiny_patch16_224"}}}
            f = tmp_path / "runs" / m / task / "results.json"
            f.parent.mkdir(parents=True)
            f.write_text(json.dumps(rec))
    spec = importlib.util.spec_from_file_location("_make_table", REPO / "scripts" / "make_table.py")
    make_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table)
    assert make_table.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--format", "csv,md"]) == 0
    t = pd.read_csv(tmp_path / "out" / "proxy.csv").set_index("method")
    assert [c for c in t.columns if c in proxy.TASKS] == list(proxy.TASKS)  # grouped: natural, specialized, structured
    assert t.loc["linear", ["natural", "specialized", "structured", "mean"]].tolist() == [15, 50, 20, 26.25]
    assert t.loc["lora", ["natural", "specialized", "structured", "mean"]].tolist() == [40, 65, 40, 46.25]
    assert t.loc["lora", "params_m_no_head"] == pytest.approx(0.018432) and t.loc["linear", "params_m_no_head"] == 0
    assert "Proxy benchmark" in (tmp_path / "out" / "proxy.md").read_text()


def test_untuned_method_is_refused_and_tuning_merges(tmp_path, monkeypatch):
    """A method without a tuned learning rate stops the benchmark with the command that tunes it;
    ``--tune --methods X`` adds X's entry to proxy_lr and to the tuning record, keeping the others'."""
    with pytest.raises(SystemExit, match="no tuned proxy learning rate for newmethod .*--tune --methods newmethod"):
        proxy_benchmark.check_tuned(["linear", "newmethod"])
    experiment, tuning = tmp_path / "proxy.yaml", tmp_path / "proxy_tuning.json"
    experiment.write_text(proxy_benchmark.EXPERIMENT.read_text())
    tuning.write_text(proxy_benchmark.TUNING_FILE.read_text())
    monkeypatch.setattr(proxy_benchmark, "EXPERIMENT", experiment)
    monkeypatch.setattr(proxy_benchmark, "TUNING_FILE", tuning)
    before = proxy_benchmark.current_lrs()

    def fake_run(method, task, out_dir, protocol, overrides, rerun):  # val accuracy peaks at lr 3e-3
        lr = float(overrides[0].split("=")[1])
        return {"val_acc": 50 - abs(torch.tensor(lr / 3e-3).log().item())}

    monkeypatch.setattr(proxy_benchmark, "run_one", fake_run)
    assert proxy_benchmark.tune(["newmethod"], tmp_path, None, False) == {"newmethod": 3e-3}
    assert proxy_benchmark.current_lrs() == {**before, "newmethod": 3e-3}
    proxy_benchmark.check_tuned(["linear", "newmethod"])
    record = json.loads(tuning.read_text())
    assert record["chosen"] == {**json.loads(proxy_benchmark.TUNING_FILE.read_text())["chosen"], "newmethod": 3e-3}
    assert set(record["val_acc"]) == set(record["chosen"])


def test_tuning_extends_the_grid_while_the_best_is_its_largest_lr(tmp_path, monkeypatch):
    monkeypatch.setattr(proxy_benchmark, "EXPERIMENT", tmp_path / "proxy.yaml")
    monkeypatch.setattr(proxy_benchmark, "TUNING_FILE", tmp_path / "proxy_tuning.json")
    (tmp_path / "proxy.yaml").write_text("proxy_lr:  # BEGIN proxy_lr\n  other: 1.0e-03\n  # END proxy_lr\n")
    tried = []

    def fake_run(method, task, out_dir, protocol, overrides, rerun):
        lr = float(overrides[0].split("=")[1])
        tried.append(lr)
        return {"val_acc": 50 - abs(torch.tensor(lr / peak).log().item())}

    monkeypatch.setattr(proxy_benchmark, "run_one", fake_run)
    peak = 0.2  # above the grid: two ×3 steps (3e-2, 9e-2), then it stops at the limit
    assert proxy_benchmark.tune(["m"], tmp_path, None, False) == {"m": 0.09}
    assert sorted(set(tried)) == [1e-3, 3e-3, 1e-2, 3e-2, 9e-2]
    tried.clear()
    peak = 0.02  # 3e-2 beats 1e-2 (closer in log scale), then 9e-2 loses: stops there
    assert proxy_benchmark.tune(["m"], tmp_path, None, False) == {"m": 0.03}
    tried.clear()
    peak = 3e-3  # inside the grid: not extended
    assert proxy_benchmark.tune(["m"], tmp_path, None, False) == {"m": 3e-3}
    assert sorted(set(tried)) == [1e-3, 3e-3, 1e-2]


@pytest.fixture(scope="module")
def quick_subset(tmp_path_factory):
    """Every method on two structured tasks with the benchmark's recipe, its tuned learning rates
    and QUICK_EPOCHS epochs, in this process on one intra-op thread (two are slower on busy
    cores). A method without a tuned learning rate stops it with the command that tunes it."""
    out = tmp_path_factory.mktemp("proxy")
    methods = proxy_benchmark.registered_methods()
    proxy_benchmark.benchmark(methods, QUICK_TASKS, out, [f"paths.data_dir={out / 'data'}",
                                                          f"trainer.epochs={QUICK_EPOCHS}"], protocol="tune")
    table = proxy_benchmark.make_table(proxy_benchmark.collect(out, "tune"), methods, QUICK_TASKS)
    print(proxy_benchmark.to_markdown(table))
    return table


# Methods that do not beat the linear probe on this subset, with what was found (README, "Proxy
# benchmark"): VPT-deep's prompts on a 6-block, 96-wide backbone with 16 patch tokens. Its tuned lr
# is inside the grid; 1, 4 or 10 tokens, no prompt dropout and VPT-shallow score alike on count
# (29-34 % val vs the probe's 31.5 %). Prompt tuning is known to need a large backbone (Lester et
# al., 2021); on the full 10-epoch benchmark it is 2.1 points above the probe on the structured mean.
WEAK_ON_PROXY = {"vpt_deep"}


@pytest.mark.slow
def test_quick_subset_peft_and_full_beat_linear_on_structured(quick_subset):
    acc = quick_subset["structured mean"]
    assert set(acc.index) == set(proxy_benchmark.registered_methods())
    # measured (README; val200, 3 epochs): linear 36.0, full 48.5, the PEFT methods 41.0 (vera) to 49.0
    # (ssf), except vpt_deep, 35.8 (WEAK_ON_PROXY)
    losers = {m: round(a, 1) for m, a in acc.items()
              if m not in ("linear", *WEAK_ON_PROXY) and not a > acc["linear"] + 2}
    assert not losers, f"not 2 points above the linear probe ({acc['linear']:.1f}%) on {QUICK_TASKS}: {losers}"
    for m in WEAK_ON_PROXY:  # it still learns (a broken method falls far below the probe) ...
        assert acc[m] > acc["linear"] - 3, f"{m} {acc[m]:.1f}% far below the linear probe {acc['linear']:.1f}%"
        # ... and the exception is lifted as soon as it is no longer needed
        assert not acc[m] > acc["linear"] + 2, f"{m} now beats the linear probe: remove it from WEAK_ON_PROXY"
    assert acc["full"] > acc["linear"] + 10, f"full fine-tuning {acc['full']:.1f}% vs linear {acc['linear']:.1f}%"
