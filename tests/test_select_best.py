"""scripts/select_best.py: picks the best lr × wd per (method, task) on val200 and refuses
anything that would select on test."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peft_vit.report.collect import SelectionError, load_records, select_best

REPO = Path(__file__).resolve().parents[1]


def tune_record(method, task, seed, lr, wd, acc, protocol="tune", overrides=None, experiment="vtab_honest"):
    split = "val200" if protocol == "tune" else "test"
    r = {"method": method, "dataset": "vtab", "task": task, "protocol": protocol, "seed": seed,
         "train_split": "train800" if protocol == "tune" else "train800val200", "eval_split": split,
         ("val_acc" if protocol == "tune" else "test_acc"): acc, "best_acc_over_epochs": acc + 1,
         "best_acc_selects_on": split, "experiment": experiment, "sweep": "s",
         "trainable_params": 1, "trainable_params_no_head": 0,
         "config": {"protocol": protocol, "seed": seed, "method": {"name": method},
                    "dataset": {"name": "vtab", "task": task}, "model": {"name": "vit_base_patch16_224.orig_in21k"},
                    "optim": {"lr": lr, "weight_decay": wd}, "paths": {"output_root": f"/x/{lr}/{wd}/{seed}"}}}
    if overrides is not None:
        r["overrides"] = overrides
    return r


def write(root, rel, rec):
    p = Path(root) / rel / "results.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(rec))


GRID = {  # (lr, wd) -> (seed 0, seed 1) val accuracy for lora/dtd
    (1e-2, 1e-4): (50.0, 52.0),
    (1e-3, 1e-4): (60.0, 62.0),   # best mean 61.0
    (1e-3, 5e-2): (61.5, 59.0),   # mean 60.25, but the best single run: must not win
    (3e-3, 1e-4): (58.0, 58.0),
}


@pytest.fixture
def sweep(tmp_path):
    for (lr, wd), accs in GRID.items():
        for seed, acc in enumerate(accs):
            write(tmp_path, f"lora_dtd/lr{lr}_wd{wd}_s{seed}", tune_record("lora", "dtd", seed, lr, wd, acc))
    # a second task with a tie: 1e-3 and 3e-3 equal -> the smaller lr wins; equal lr -> larger wd
    write(tmp_path, "lora_cifar/a", tune_record("lora", "cifar", 0, 3e-3, 1e-4, 70.0))
    write(tmp_path, "lora_cifar/b", tune_record("lora", "cifar", 0, 1e-3, 1e-4, 70.0))
    write(tmp_path, "lora_cifar/c", tune_record("lora", "cifar", 0, 1e-3, 5e-2, 70.0))
    write(tmp_path, "lora_cifar/d", tune_record("lora", "cifar", 0, 1e-2, 5e-2, 65.0))
    return tmp_path


def test_picks_best_mean_over_seeds(sweep):
    sels = select_best(load_records([sweep]).records)
    by_task = {s.task: s for s in sels}
    dtd = by_task["dtd"]
    assert dtd.keys == ["optim.lr", "optim.weight_decay"]
    assert dict(dtd.best.values) == {"optim.lr": 1e-3, "optim.weight_decay": 1e-4}
    assert dtd.best.mean == pytest.approx(61.0) and sorted(dtd.best.seeds) == [0, 1]
    assert [round(c.mean, 2) for c in dtd.candidates] == [61.0, 60.25, 58.0, 51.0]


def test_tie_rule_is_deterministic(sweep):
    cifar = {s.task: s for s in select_best(load_records([sweep]).records)}["cifar"]
    # 70.0 three ways: smaller lr first (1e-3), then the larger weight decay (5e-2)
    assert dict(cifar.best.values) == {"optim.lr": 1e-3, "optim.weight_decay": 5e-2}
    assert [dict(c.values)["optim.lr"] for c in cifar.candidates] == [1e-3, 1e-3, 3e-3, 1e-2]


def test_refuses_final_and_test(sweep):
    write(sweep, "final/run", tune_record("lora", "dtd", 0, 1e-3, 1e-4, 99.0, protocol="final"))
    with pytest.raises(SelectionError, match="select on test"):
        select_best(load_records([sweep]).records)
    # --ignore-final skips it: the 99.0 test number never influences the choice
    notes = []
    sels = select_best(load_records([sweep]).records, ignore_final=True, notes=notes)
    dtd = {s.task: s for s in sels}["dtd"]
    assert dtd.best.mean == pytest.approx(61.0) and any(n.startswith("skipped") for n in notes)


def test_refuses_a_tune_record_evaluated_on_test(tmp_path):
    r = tune_record("lora", "dtd", 0, 1e-3, 1e-4, 60.0)
    r["eval_split"] = "test"
    write(tmp_path, "x", r)
    with pytest.raises(SelectionError):
        select_best(load_records([tmp_path]).records)


def test_refuses_unknown_metric(sweep):
    with pytest.raises(SelectionError):
        select_best(load_records([sweep]).records, metric="test_acc")
    # max over epochs on val is allowed (it selects on val200)
    sels = select_best(load_records([sweep]).records, metric="best_acc_over_epochs")
    assert {s.task: s for s in sels}["dtd"].best.mean == pytest.approx(62.0)


def test_final_overrides(sweep):
    dtd = {s.task: s for s in select_best(load_records([sweep]).records)}["dtd"]
    assert not dtd.overrides_exact  # rebuilt: the records store no overrides
    assert dtd.final_overrides([0, 1, 2]) == [
        "experiment=vtab_honest", "method=lora", "dataset=vtab/dtd", "optim.lr=0.001", "optim.weight_decay=0.0001",
        "protocol=final", "seed=0,1,2"]


def test_final_overrides_from_recorded_overrides(tmp_path):
    ov = ["experiment=vtab_honest", "method=householder", "method.rank=2", "dataset=vtab/dtd", "optim.lr=0.01",
          "optim.weight_decay=0.05", "protocol=tune", "seed=0", "hydra/launcher=slurm"]
    write(tmp_path, "a", tune_record("householder", "dtd", 0, 1e-2, 5e-2, 60.0, overrides=ov))
    ov2 = [o.replace("0.01", "0.001") for o in ov]
    write(tmp_path, "b", tune_record("householder", "dtd", 0, 1e-3, 5e-2, 65.0, overrides=ov2))
    s = select_best(load_records([tmp_path]).records)[0]
    assert s.overrides_exact
    assert s.final_overrides([0, 1, 2]) == [
        "experiment=vtab_honest", "method=householder", "method.rank=2", "dataset=vtab/dtd",
        "optim.weight_decay=0.05", "hydra/launcher=slurm", "optim.lr=0.001", "protocol=final", "seed=0,1,2"]


def select_best_main(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_select_best", REPO / "scripts" / "select_best.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_cli_writes_jobs_and_refuses_final(sweep, tmp_path, capsys):
    out = tmp_path / "sel"
    assert select_best_main([str(sweep), "--out", str(out)]) == 0
    assert "optim.lr=0.001 optim.weight_decay=0.0001" in capsys.readouterr().out
    jobs = (out / "final_jobs.txt").read_text().splitlines()
    assert len(jobs) == 2 * 3  # 2 tasks × 3 seeds
    assert ("experiment=vtab_honest method=lora dataset=vtab/dtd optim.lr=0.001 optim.weight_decay=0.0001 "
            "protocol=final seed=2") in jobs
    cmds = (out / "final_commands.sh").read_text()
    assert ("python train.py -m experiment=vtab_honest method=lora dataset=vtab/dtd optim.lr=0.001 "
            "optim.weight_decay=0.0001 protocol=final seed=0,1,2") in cmds
    doc = yaml.safe_load((out / "selection.yaml").read_text())
    assert {d["task"] for d in doc} == {"dtd", "cifar"} and all(d["selected_on"].startswith("val200") for d in doc)

    write(sweep, "final/run", tune_record("lora", "dtd", 0, 1e-3, 1e-4, 99.0, protocol="final"))
    assert select_best_main([str(sweep), "--out", str(out)]) == 2
    assert "select on test" in capsys.readouterr().err


def test_cli_runs_as_a_script(sweep, tmp_path):
    r = subprocess.run([sys.executable, "scripts/select_best.py", str(sweep), "--out", str(tmp_path / "s"),
                        "--seeds", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "s" / "final_jobs.txt").read_text().splitlines()) == 2


def test_final_jobs_compose(sweep, tmp_path):
    """Each written job is a valid command line for train.py (it composes)."""
    from conftest import compose

    dtd = {s.task: s for s in select_best(load_records([sweep]).records)}["cifar"]
    cfg = compose(*dtd.final_overrides([1]))
    assert cfg.protocol == "final" and cfg.seed == 1 and cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-2


def test_final_overrides_from_hydra_dir(tmp_path):
    """Without `overrides` in results.json, the job's .hydra/overrides.yaml is used."""
    for lr, acc in ((1e-2, 60.0), (1e-3, 65.0)):
        write(tmp_path, f"lr{lr}", tune_record("lora", "dtd", 0, lr, 1e-4, acc))
        (tmp_path / f"lr{lr}" / ".hydra").mkdir()
        (tmp_path / f"lr{lr}" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            ["experiment=vtab_honest", "dataset=vtab/dtd", "trainer.epochs=50", f"optim.lr={lr}", "protocol=tune"]))
    s = select_best(load_records([tmp_path]).records)[0]
    assert s.overrides_exact
    assert s.final_overrides([0]) == ["experiment=vtab_honest", "dataset=vtab/dtd", "trainer.epochs=50",
                                      "optim.lr=0.001", "protocol=final", "seed=0"]
