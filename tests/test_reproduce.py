"""scripts/reproduce.py: the plan of every recipe (stages, job counts, the estimate) from the composed
presets, its refusals, and one recipe end to end on a CPU with the local launcher, killed mid-grid and
re-run: the re-run trains only what is missing and ends with the table."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import reproduce
from peft_vit.config import preset_methods
from reproduce import RECIPES, PlanError, make_plan, show_plan, stage_commands
from test_sweep_local import REPO, job_env, make_vtab, results

VTAB19 = 19


@pytest.fixture(scope="module")
def hta19():
    return make_plan("vtab_hta")


def test_vtab_hta_on_19_tasks_plans_722_jobs(hta19):
    p = hta19
    assert [s.name for s in p.stages] == ["grid", "selection", "final", "table"]
    grid, sel, final, table = p.stages
    assert len(p.tasks) == VTAB19 and p.grid == {
        "optim.lr": ["0.2", "0.1", "0.05", "0.01", "0.005", "0.001", "0.0001"],
        "optim.weight_decay": ["0.05", "0.01", "0.005", "0.001", "0.0"]}
    assert (grid.n, sel.n, final.n, table.n, p.n) == (19 * 35, 0, 19 * 3, 0, 722)
    # 100 epochs of ⌊800 / 64⌋ = 12 steps on train800, ⌊1000 / 64⌋ = 15 on train800val200, evaluated every epoch
    assert {(j.steps, j.evaluations, j.evaluated) for j in grid.jobs} == {(1200, 100, 200)}
    assert {(j.steps, j.evaluations) for j in final.jobs} == {(1500, 100)}
    assert {j.task: j.evaluated for j in final.jobs}["dsprites_loc"] == 73_728
    # the estimate: 0.05 s per step of 64 images; an evaluated image a third of a trained one
    j = grid.jobs[0]
    assert j.gpu_s(0.05 / 64) == pytest.approx((1200 * 64 + 100 * 200 / 3) * 0.05 / 64)
    assert p.gpu_h(grid) == pytest.approx(665 * j.gpu_s(0.05 / 64) / 3600)
    text = show_plan(p)
    for words in ("665 jobs", "57 jobs", "total: 722 jobs", "protocol tune: fit train800, evaluate val200",
                  "on val200 (protocol tune), never on test", "protocol final: fit train800val200, evaluate test",
                  "final/max-over-epochs (selects on test", "assumed, not measured"):
        assert words in text, (words, text)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_plans_from_its_preset_or_names_the_missing_file(recipe, tmp_path):
    """Generic over the recipe table: a recipe whose preset is in this checkout plans methods × tasks ×
    seeds final jobs (after a grid where the preset has hydra.sweeper.params); one whose preset is not
    is refused naming the file."""
    spec = RECIPES[recipe]
    first = next(iter(reproduce.registry(spec.benchmark)))
    preset = REPO / "configs" / "experiment" / f"{spec.preset}.yaml"
    if not preset.is_file():
        with pytest.raises(PlanError, match=f"configs/experiment/{spec.preset}.yaml does not exist"):
            make_plan(recipe, [first])
        return
    methods = preset_methods(spec.preset)
    assert spec.benchmark in reproduce.SPLITS and methods and recipe.startswith(spec.benchmark + "_")
    for m in methods:
        assert (REPO / "configs" / "method" / f"{m}.yaml").is_file(), m
    raw = yaml.safe_load(preset.read_text())
    # a preset with per-task values (vtab_vpt: 3 tasks) plans a task it has values for
    first = next((next(iter(t[spec.benchmark])) for k, t in raw.items()
                  if k.endswith("_hparams") and spec.benchmark in t), first)
    p = make_plan(recipe, [first], seeds=[0, 1], out=tmp_path)
    sweeper = raw.get("hydra")
    assert bool(p.grid) == bool(sweeper and sweeper["sweeper"]["params"])
    final = next(s for s in p.stages if s.name == "final")
    assert final.n == len(methods) * 2 and {j.method for j in final.jobs} == set(methods)
    assert p.stages[-1].name == "table" and all(j.steps > 0 for s in p.stages for j in s.jobs)
    if not p.grid:  # one sweep of methods × tasks × seeds into the fixed final directory
        (cmd,) = stage_commands(p, "final")
        assert f"hydra.sweep.dir={(tmp_path / recipe / 'final').resolve()}" in cmd
        assert {"protocol=final", "seed=0,1", f"experiment={spec.preset}", "method=" + ",".join(methods),
                f"dataset={spec.benchmark}/{first}"} <= set(cmd)


def test_fixed_and_fgvc_recipes_count_their_jobs():
    noah = make_plan("vtab_noah", ["cifar", "dtd"])  # the methods of NOAH's rows: LoRA, Adapter, AdaptFormer
    assert noah.methods == ["lora", "adapter", "adaptformer"]
    assert not noah.grid and [s.name for s in noah.stages] == ["final", "table"] and noah.n == 3 * 2 * 3
    fgvc = make_plan("fgvc_hta", ["cub"], seeds=[0])
    assert fgvc.n == 35 + 1
    # FGVC sizes: fit train (5,394) on the grid, train+val (5,994) in the final
    assert [j.steps for s in fgvc.stages for j in s.jobs] == [100 * (5394 // 64), 100 * (5994 // 64)]
    assert "protocol tune: fit train, evaluate val" in show_plan(fgvc)


def test_overrides_replace_the_grid_and_reach_every_job(tmp_path):
    p = make_plan("vtab_hta", ["cifar", "dtd"], seeds=[0], out=tmp_path,
                  overrides=["optim.lr=0.1,0.01", "optim.weight_decay=0.0", "trainer.epochs=2",
                             "trainer.batch_size=16", "hydra.launcher.gpus_per_node=0"])
    assert p.grid == {"optim.lr": ["0.1", "0.01"]}  # a value given once is no longer swept
    assert [s.n for s in p.stages] == [4, 0, 2, 0]
    assert {j.steps for j in p.stages[0].jobs} == {2 * (800 // 16)}
    (cmd,) = stage_commands(p, "grid")
    assert cmd[2:6] == ["-m", "hydra/launcher=local", f"hydra.sweep.dir={(tmp_path / 'vtab_hta' / 'grid').resolve()}",
                        "hydra.launcher.gpus_per_node=0"]
    assert {"protocol=tune", "dataset=vtab/cifar,vtab/dtd", "optim.lr=0.1,0.01", "trainer.epochs=2"} <= set(cmd)
    assert stage_commands(p, "grid", "slurm")[0][3] == "hydra/launcher=slurm"


def test_tasks_the_preset_has_no_values_for_are_left_out_and_named_unless_asked_for():
    """A per-task table with rows for some tasks only (as vtab_vpt's official values): by default the
    plan covers the tasks that compose and names the others; asked for by --tasks, one is refused."""
    rows = ["+rows={dtd: 3, kitti: 4}", "trainer.epochs='${rows.${dataset.task}}'"]
    p = make_plan("vtab_rlrr", seeds=[0], overrides=rows)
    assert p.tasks == ["dtd", "kitti"] and len(p.uncovered) == VTAB19 - 2
    assert [(j.task, j.epochs) for j in p.stages[0].jobs] == [("dtd", 3), ("kitti", 4)]
    assert "left out, the preset has no values for them: cifar, caltech101" in show_plan(p)
    with pytest.raises(PlanError, match="dataset=vtab/cifar does not compose: Interpolation key 'rows.cifar'"):
        make_plan("vtab_rlrr", ["dtd", "cifar"], overrides=rows)


def test_measured_step_times_from_benchmark_json(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [{"method": "lora", "batch": 64, "step_time_s": 0.032,
                                              "device_name": "GPU X"}]}))
    p = make_plan("vtab_noah", ["dtd"], methods=["lora"], bench=bench)
    assert p.img_s == {"lora": 0.032 / 64} and "GPU X" in p.assumes and "32.0 ms at batch 64" in p.assumes
    with pytest.raises(PlanError, match="no step time for adapter"):
        make_plan("vtab_noah", ["dtd"], bench=bench)


@pytest.mark.parametrize("args, match", [
    (dict(recipe="vtab_nope"), "unknown recipe 'vtab_nope'; known: vtab_hta"),
    (dict(recipe="vtab_hta", tasks=["cifar", "imagenet"]), "unknown vtab task.*imagenet; known: cifar"),
    (dict(recipe="vtab_hta", methods=["nope"]), "unknown method.*nope"),
    (dict(recipe="vtab_hta", overrides=["method=lora"]), "the recipe sets method; use --methods"),
    (dict(recipe="vtab_hta", seeds=[]), "--seeds"),
    (dict(recipe="vtab_rlrr", tasks=["dtd"], overrides=["optim.lr=0.1,0.01"]),
     "vtab_rlrr has no grid on val: a sweep override \\(optim.lr\\) would run every value on test"),
    (dict(recipe="vtab_hta", overrides=["a=${b.${c}}"]), "overrides: Error parsing override"),
    (dict(recipe="vtab_hta", tasks=["dtd"], overrides=["trainer.epochs=${nope}"]),
     "experiment=vtab_hta method=householder dataset=vtab/dtd does not compose: .*nope"),
])
def test_bad_input_is_named(args, match):
    with pytest.raises(PlanError, match=match):
        make_plan(**args)


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert reproduce.main(["vtab_rlrr", "--tasks", "dtd", "--seeds", "0", "--out", str(tmp_path / "o"),
                           "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1. final" in out and "1 jobs" in out and "grid" not in out.split("\n\n")[1]
    assert not (tmp_path / "o").exists()
    assert reproduce.main(["vtab_hta", "--tasks", "nope", "--dry-run"]) == 2
    assert "unknown vtab task" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end, on a CPU

TINY = ["model=vit_tiny_test", "logger=none", "trainer.num_workers=0", "trainer.epochs=2", "trainer.batch_size=16",
        "trainer.eval_batch_size=64", "trainer.progress=false", "dataset.prepare_if_missing=false",
        "optim.lr=0.1,0.01", "optim.weight_decay=0.0",  # a 2-point grid instead of HTA's 35
        "hydra.launcher.gpus_per_node=0", "hydra.launcher.array_parallelism=2", "hydra.launcher.poll_s=0.5"]


@pytest.mark.slow
def test_vtab_hta_end_to_end_killed_mid_grid_then_rerun(tmp_path):
    """vtab_hta on 2 generated tasks (tiny ViT, 2 epochs, grid lr ∈ {0.1, 0.01}, seed 0): SIGKILL the
    driver's whole process group once the first grid run finished; the same command again skips the
    finished runs (not re-trained), completes grid, selection and final, and writes the table with the
    paper's row; a third run trains nothing."""
    data = make_vtab(tmp_path / "vtab-1k")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce.py"), "vtab_hta", "--tasks", "cifar,dtd", "--seeds", "0",
           "--out", str(out), *TINY, f"dataset.root={data}"]
    grid, final = out / "vtab_hta" / "grid", out / "vtab_hta" / "final"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            t0 = time.time()
            while not results(grid) and proc.poll() is None and time.time() - t0 < 400:
                time.sleep(0.2)
            assert results(grid), (tmp_path / "first.log").read_text()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, train.py -m and its jobs
            proc.wait()
    done = {p: p.stat().st_mtime_ns for p in results(grid)}
    assert 1 <= len(done) < 4 and not final.exists()

    p = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-5000:]
    assert log.count("[skip: ") == len(done), log[-5000:]
    assert {q: q.stat().st_mtime_ns for q in done} == done  # the finished grid runs were not re-trained
    tuned, finals = results(grid), results(final)
    assert sorted((r["task"], r["config"]["optim"]["lr"], r["protocol"]) for r in tuned.values()) == [
        ("cifar", 0.01, "tune"), ("cifar", 0.1, "tune"), ("dtd", 0.01, "tune"), ("dtd", 0.1, "tune")]
    chosen = {d["task"]: d for d in yaml.safe_load((out / "vtab_hta" / "selection" / "selection.yaml").read_text())}
    assert {d["selected_on"] for d in chosen.values()} == {"val200 (protocol tune)"}
    assert sorted((r["task"], r["protocol"], r["seed"], r["eval_split"]) for r in finals.values()) == [
        ("cifar", "final", 0, "test"), ("dtd", "final", 0, "test")]
    for r in finals.values():  # each final run trained with its task's selected lr
        assert r["config"]["optim"]["lr"] == chosen[r["task"]]["chosen"]["optim.lr"]
    md = (out / "vtab_hta" / "table" / "vtab.md").read_text()
    for words in ("paper: max test acc over epochs", "HTA", "final/last-epoch",
                  "final/max-over-epochs (selects on test)", "vtab_hta"):
        assert words in md and words in p.stdout, words
    assert "total: 6 jobs" in p.stdout and "protocol tune: fit train800" in p.stdout
    assert "protocol final: fit train800val200, evaluate test" in p.stdout

    before = {q: q.stat().st_mtime_ns for q in [*tuned, *finals]}
    again = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("[skip: ") == 6
    assert {q: q.stat().st_mtime_ns for q in [*results(grid), *results(final)]} == before  # nothing re-trained
