#!/usr/bin/env python
"""One command from nothing to a paper's table: the recipe's stages through the normal Hydra launchers.

    python scripts/reproduce.py vtab_hta --dry-run                       # the plan only: stages, jobs, GPU-hours
    python scripts/reproduce.py vtab_hta                                 # grid -> selection -> final -> table
    python scripts/reproduce.py vtab_noah --tasks cifar,dtd --seeds 0 --launcher slurm hydra.launcher.partition=gpu

A recipe is a preset of configs/experiment/ (:data:`RECIPES`) run for the methods it covers
(``peft_vit.config.preset_methods``: its default method and each method with a file in
configs/experiment_method/<preset>/); the rest is read from the composed preset, per task and method. The stages:

1. grid (only where the preset has ``hydra.sweeper.params``, e.g. vtab_hta's lr × wd): protocol
   tune, fit train800, evaluate val200 (FGVC: train -> val); one ``train.py -m`` sweep.
2. selection: ``scripts/select_best.py``'s rules (peft_vit.report.select_best) on the grid's val200
   records only; it refuses anything evaluated on test. Writes ``selection/`` as select_best.py does.
3. final: protocol final, fit train800val200, evaluate test (FGVC: train+val -> test), each seed;
   the selected values (grid recipes) or the preset's own (fixed recipes).
4. table: ``scripts/make_table.py --paper``'s table of the final records (final/last-epoch, and
   final/max-over-epochs, which selects on test as the papers do) with the recipe's paper rows and
   ours − paper; written to ``<out>/<recipe>/table/`` and printed.

Re-running the same command after an interruption does only what is missing: every stage has a fixed
sweep directory, ``<out>/<recipe>/{grid,final}`` (not timestamped), and the launchers skip a job whose
results.json exists (``skip_done``) and resume one that has a checkpoint. Extra arguments are Hydra
overrides given to every job (``trainer.epochs=2``; a key of the grid with several values replaces
the preset's values, e.g. ``optim.lr=0.1,0.01``; a recipe without a grid refuses several values, which
would all run on test); ``hydra.*`` ones go to the launcher.

The GPU-hours are an estimate: steps per job = epochs × ⌊fit images / batch⌋ (trainer.drop_last;
⌈⌉ without it), plus one pass over the evaluation split every ``eval_every`` epochs and after the
last, an evaluated image costing a third of a trained one (forward only vs forward + backward +
update); image counts are the task registry's (peft_vit.data.vtab / .fgvc). A trained image costs
``--step-s`` / 64 seconds for every method (an assumption, not a measurement), or, with ``--bench
FILE``, each method's measured step time / batch from ``python scripts/benchmark.py --device cuda
--batch 64 --out FILE``. Start-up, data decoding and queueing are not counted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    preset: str                 # configs/experiment/<preset>.yaml
    benchmark: str              # vtab | fgvc: the task registry and the table


# one line per recipe; its methods, grid, epochs, batch, evaluation and per-task values come from the composed preset
RECIPES: Dict[str, Recipe] = {
    "vtab_hta": Recipe("vtab_hta", "vtab"),
    "vtab_rlrr": Recipe("vtab_rlrr", "vtab"),
    "vtab_noah": Recipe("vtab_noah", "vtab"),
    "vtab_fact": Recipe("vtab_fact", "vtab"),
    "vtab_ssf": Recipe("vtab_ssf", "vtab"),
    "vtab_vpt": Recipe("vtab_vpt", "vtab"),
    "vtab_honest": Recipe("vtab_honest", "vtab"),
    "fgvc_hta": Recipe("fgvc_hta", "fgvc"),
    "fgvc_rlrr": Recipe("fgvc_rlrr", "fgvc"),
}
# per benchmark and protocol: the fitted and the evaluated split, as the records name them
SPLITS = {"vtab": {"tune": ("train800", "val200"), "final": ("train800val200", "test")},
          "fgvc": {"tune": ("train", "val"), "final": ("train+val", "test")}}
STEP_S = 0.05  # assumed s per training step of 64 images (--step-s)


def registry(benchmark: str) -> Dict[str, Dict[str, int]]:
    """task -> split -> images (train800val200 / train+val included), in the papers' column order."""
    from peft_vit.data import fgvc, vtab

    if benchmark == "vtab":
        return {t: s.expected_sizes() for t, s in vtab.TASKS.items()}
    return {t: {**(n := s.expected_sizes()), "train+val": n["train"] + n["val"]} for t, s in fgvc.DATASETS.items()}


# ------------------------------------------------------------------------------------------ plan

@dataclass
class Job:
    """The jobs of one (method, task) in one stage."""
    method: str
    task: str
    count: int
    epochs: int
    batch: int
    eval_every: int
    fit: int            # images fitted
    evaluated: int      # images per evaluation
    drop_last: bool = True

    @property
    def steps(self) -> int:
        per_epoch = self.fit // self.batch if self.drop_last else math.ceil(self.fit / self.batch)
        return self.epochs * per_epoch

    @property
    def evaluations(self) -> int:
        every = self.eval_every or self.epochs
        return self.epochs // every + (self.epochs % every != 0)

    def gpu_s(self, img_s: float) -> float:
        """One job's seconds at ``img_s`` seconds per trained image."""
        return (self.steps * self.batch + self.evaluations * self.evaluated / 3) * img_s


@dataclass
class Stage:
    name: str
    what: str
    jobs: List[Job] = field(default_factory=list)

    n = property(lambda self: sum(j.count for j in self.jobs))


@dataclass
class Plan:
    recipe: str
    spec: Recipe
    methods: List[str]
    tasks: List[str]
    seeds: List[int]
    grid: Dict[str, List[str]]      # key -> values swept on val (empty: a fixed recipe)
    stages: List[Stage]
    overrides: List[str]            # the user's Hydra overrides, given to every job
    out: Path
    img_s: Dict[str, float]         # method -> s per trained image
    assumes: str
    uncovered: Dict[str, str] = field(default_factory=dict)  # task -> why the preset leaves it out

    dirs = property(lambda self: {k: self.out / self.recipe / k for k in ("grid", "selection", "final", "table")})
    n = property(lambda self: sum(s.n for s in self.stages))

    def gpu_h(self, stage: Stage) -> float:
        return sum(j.count * j.gpu_s(self.img_s[j.method]) for j in stage.jobs) / 3600


class PlanError(ValueError):
    pass


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def sweep_values(key: str, value: str) -> List[str]:
    """The values of ``key=value`` as Hydra's sweeper expands them (``0.1,0.01`` -> two)."""
    o = _parser().parse_override(f"{key}={value}")
    return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]


def make_plan(recipe: str, tasks: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1, 2),
              methods: Optional[Sequence[str]] = None, overrides: Sequence[str] = (),
              out: Path = Path("outputs/reproduce"), step_s: float = STEP_S, bench: Optional[Path] = None) -> Plan:
    """The stages, their jobs and the estimate, from the recipe's composed preset (one composition per
    method and task, so per-task values such as epochs or batch count as the jobs will run them)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from peft_vit.config import CONFIG_DIR, preset_methods

    if recipe not in RECIPES:
        raise PlanError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    spec = RECIPES[recipe]
    if not (CONFIG_DIR / "experiment" / f"{spec.preset}.yaml").is_file():
        raise PlanError(f"recipe {recipe}: configs/experiment/{spec.preset}.yaml does not exist in this checkout")
    reg = registry(spec.benchmark)
    explicit, tasks, uncovered = bool(tasks), list(tasks or reg), {}
    if bad := [t for t in tasks if t not in reg]:
        raise PlanError(f"--tasks: unknown {spec.benchmark} task(s) {', '.join(bad)}; known: {', '.join(reg)}")
    methods = list(methods or preset_methods(spec.preset))
    if bad := [m for m in methods if not (CONFIG_DIR / "method" / f"{m}.yaml").is_file()]:
        raise PlanError(f"--methods: unknown method(s) {', '.join(bad)} (configs/method/)")
    if not seeds:
        raise PlanError("--seeds: give at least one seed")
    try:
        parsed = _parser().parse_overrides(list(overrides))
    except Exception as e:  # noqa: BLE001 - hydra.errors.OverrideParseException
        raise PlanError(f"overrides: {str(e).splitlines()[0]}") from e
    for o in parsed:
        if o.key_or_group in ("experiment", "method", "dataset", "protocol", "seed"):
            raise PlanError(f"override {o.input_line}: the recipe sets {o.key_or_group}; use --methods / --tasks / "
                            "--seeds instead")
    user_sweeps = {o.key_or_group: list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    # compose with each sweep's first value and without the launcher's overrides
    fixed = [o.input_line if not o.is_sweep_override() else f"{o.key_or_group}={user_sweeps[o.key_or_group][0]}"
             for o in parsed if not o.key_or_group.startswith("hydra")]
    fixed_keys = {o.key_or_group for o in parsed if not o.is_sweep_override()}

    img_s = {m: step_s / 64 for m in methods}
    assumes = f"{step_s:g} s per training step of 64 images for every method (assumed, not measured; --step-s)"
    if bench is not None:
        try:
            res = {r["method"]: r for r in json.loads(Path(bench).read_text())["results"] if "error" not in r}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlanError(f"--bench {bench}: not a scripts/benchmark.py --out file ({e})") from e
        if missing := [m for m in methods if m not in res]:
            raise PlanError(f"--bench {bench}: no step time for {', '.join(missing)}; run scripts/benchmark.py "
                            f"--methods {' '.join(missing)} --device cuda --out {bench}")
        img_s = {m: res[m]["step_time_s"] / res[m]["batch"] for m in methods}
        devs = sorted({str(res[m].get("device_name") or res[m].get("device")) for m in methods})
        assumes = (f"measured step times from {bench} ({', '.join(devs)}; "
                   + ", ".join(f"{m} {res[m]['step_time_s'] * 1e3:.1f} ms at batch {res[m]['batch']}" for m in methods)
                   + "), scaled to each job's batch")

    grid: Dict[str, List[str]] = {}
    split = SPLITS[spec.benchmark]
    stages = {"grid": Stage("grid", f"protocol tune: fit {split['tune'][0]}, evaluate {split['tune'][1]}"),
              "final": Stage("final", f"protocol final: fit {split['final'][0]}, evaluate {split['final'][1]}")}
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        def composed(m: str, t: str, protocol: str):
            try:
                cfg = compose("config", return_hydra_config=True, overrides=[
                    f"experiment={spec.preset}", f"method={m}", f"dataset={spec.benchmark}/{t}",
                    f"protocol={protocol}", *fixed])
                params = OmegaConf.to_container(OmegaConf.select(cfg, "hydra.sweeper.params") or OmegaConf.create())
                HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in the job
                # the whole job config resolves, as train.py needs it (a preset's table without this row fails here)
                job = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
                return params, job["trainer"]
            except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors: name the job
                raise PlanError(f"recipe {recipe}: experiment={spec.preset} method={m} dataset={spec.benchmark}/{t} "
                                f"does not compose: {str(e).splitlines()[0]}") from e

        for t in tasks:
            try:
                made = [(m, protocol, *composed(m, t, protocol)) for m in methods for protocol in ("tune", "final")]
            except PlanError as e:
                if explicit:
                    raise
                uncovered[t] = str(e)  # all tasks asked for: a task the preset has no values for is left out
                continue
            for m, protocol, params, tc in made:
                g = {k: user_sweeps.get(k) or sweep_values(k, str(v)) for k, v in params.items() if k not in fixed_keys}
                g.update({k: v for k, v in user_sweeps.items() if k not in g})
                if protocol == "tune":
                    if not params:
                        continue  # a fixed recipe: no grid
                    if grid and g != grid:
                        raise PlanError(f"recipe {recipe}: the grid differs between {m}/{t} and the first task")
                    grid = g
                count = math.prod(len(v) for v in g.values()) if protocol == "tune" else len(seeds)
                fit, ev = split[protocol]
                stages["grid" if protocol == "tune" else "final"].jobs.append(Job(
                    m, t, count, int(tc["epochs"]), int(tc["batch_size"]), int(tc["eval_every"] or 0),
                    reg[t][fit], reg[t][ev], bool(tc.get("drop_last", True))))
    if user_sweeps and not grid:
        raise PlanError(f"recipe {recipe} has no grid on val: a sweep override ({', '.join(user_sweeps)}) would run "
                        "every value on test; give one value, or use a recipe with a grid (e.g. vtab_honest)")
    if len(uncovered) == len(tasks):
        raise PlanError(next(iter(uncovered.values())) + " (and every other task)")
    tasks = [t for t in tasks if t not in uncovered]
    sel = Stage("selection", f"best per method and task on {split['tune'][1]} (protocol tune), never on test; "
                             "scripts/select_best.py's rules")
    table = Stage("table", "make_table --paper: final/last-epoch and final/max-over-epochs (selects on test, the "
                           "papers' protocol) beside the paper rows, ours − paper")
    order = ([stages["grid"], sel] if grid else []) + [stages["final"], table]
    return Plan(recipe, spec, methods, tasks, list(seeds), grid, order, list(overrides), Path(out), img_s, assumes,
                uncovered)


def show_plan(p: Plan) -> str:
    """The plan as printed (--dry-run prints only this)."""
    ds = {"vtab": "VTAB-1k", "fgvc": "FGVC"}[p.spec.benchmark]
    lines = [f"reproduce {p.recipe}: experiment={p.spec.preset}, method {', '.join(p.methods)}, {len(p.tasks)} "
             f"{ds} task{'s' * (len(p.tasks) > 1)}, final seeds {','.join(map(str, p.seeds))}",
             f"outputs: {p.out / p.recipe}/{{{','.join(k for k in p.dirs if p.grid or k in ('final', 'table'))}}}"]
    if p.uncovered:
        lines.append(f"left out, the preset has no values for them: {', '.join(p.uncovered)} "
                     f"(e.g. {next(iter(p.uncovered.values()))})")
    if p.overrides:
        lines.append(f"overrides for every job: {' '.join(p.overrides)}")
    if p.grid:
        size = " × ".join(f"{k} {len(v)}" for k, v in p.grid.items())
        lines.append(f"grid: {size} = {math.prod(map(len, p.grid.values()))} per method and task "
                     "(" + "; ".join(f"{k}: {','.join(v)}" for k, v in p.grid.items()) + ")")
    lines.append("")
    for i, s in enumerate(p.stages, 1):
        cost = f"{s.n:>6} jobs {p.gpu_h(s):>7.1f} GPU-h" if s.jobs else f"{0:>6} jobs {'CPU':>13}"
        lines.append(f"{i}. {s.name:<9} {cost}   {s.what}")
        if s.name == "selection":
            lines.append(f"{'':14}-> {p.dirs['selection']}/selection.yaml")
        if s.name == "table":
            lines.append(f"{'':14}-> {p.dirs['table']}/{p.spec.benchmark}.md, .csv")
    lines.append(f"total: {p.n} jobs, {sum(p.gpu_h(s) for s in p.stages):.1f} GPU-h (estimate)")
    lines += ["", f"{'task':<14} {'method':<12} " + " ".join(
        f"{s.name + ' jobs':>10} {'steps/job':>9} {'evals':>5} {'GPU-h':>7}" for s in p.stages if s.jobs)]
    rows = {}
    for s in (s for s in p.stages if s.jobs):
        for j in s.jobs:
            gpu_h = j.count * j.gpu_s(p.img_s[j.method]) / 3600
            rows.setdefault((j.task, j.method), []).append(
                f"{j.count:>10} {j.steps:>9} {j.evaluations:>5} {gpu_h:>7.2f}")
    lines += [f"{t:<14} {m:<12} " + " ".join(cells) for (t, m), cells in rows.items()]
    lines += ["", "estimate: steps = epochs × ⌊fit images / batch⌋; an evaluation every eval_every epochs and after "
                  "the last, an evaluated image = 1/3 of a trained one; image counts from the task registry;",
              f"  {p.assumes}; start-up, decoding and queueing not counted"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- run

class StageFailed(RuntimeError):
    pass


def _launch(cmds: List[List[str]], launcher: str, name: str) -> None:
    """Runs the stage's ``train.py -m`` sweeps and waits for them: one after another on one machine,
    all at once on SLURM (each is one job array)."""
    procs = []
    for cmd in cmds:
        print("$ python " + " ".join(map(shlex.quote, cmd[1:])), flush=True)
        procs.append(subprocess.Popen(cmd, cwd=REPO))
        if launcher == "local":
            procs[-1].wait()
    failed = sum(p.wait() != 0 for p in procs)
    if failed:
        raise StageFailed(f"stage {name}: {failed} of {len(cmds)} sweep(s) failed (see above); fix the cause and "
                          "re-run the same command: finished runs are skipped, interrupted ones resume")


def _train(p: Plan, stage: str, launcher: str, overrides: Sequence[str]) -> List[str]:
    hydra = [o for o in p.overrides if o.startswith(("hydra.", "hydra/"))]
    return [sys.executable, str(REPO / "train.py"), "-m", f"hydra/launcher={launcher}",
            f"hydra.sweep.dir={p.dirs[stage].resolve()}", *hydra, *overrides]


def stage_commands(p: Plan, stage: str, launcher: str = "local") -> List[List[str]]:
    """The ``train.py -m`` sweeps of a grid or final stage, each into the stage's fixed sweep directory:
    one sweep for the grid (methods × tasks × grid) and for a fixed recipe's final (methods × tasks ×
    seeds); after a grid, one per selected (method, task), from ``selection/selection.yaml``."""
    import yaml

    job_ov = [o for o in p.overrides if not o.startswith(("hydra.", "hydra/"))]
    head = [f"experiment={p.spec.preset}", "method=" + ",".join(p.methods),
            "dataset=" + ",".join(f"{p.spec.benchmark}/{t}" for t in p.tasks)]
    if stage == "grid":
        return [_train(p, "grid", launcher, [*head, "protocol=tune", *job_ov])]
    if not p.grid:
        return [_train(p, "final", launcher, [*head, "protocol=final", "seed=" + ",".join(map(str, p.seeds)), *job_ov])]
    doc = yaml.safe_load((p.dirs["selection"] / "selection.yaml").read_text())
    return [_train(p, "final", launcher, d["final_overrides"]) for d in doc
            if d["method"] in p.methods and d["task"] in p.tasks]


def _mine(p: Plan, records):
    return [r for r in records if r.dataset == p.spec.benchmark and r.experiment == p.spec.preset
            and r.method in p.methods and r.task in p.tasks]


def run(p: Plan, launcher: str = "local") -> Path:
    """The stages in order, each waited for; returns the table's Markdown file."""
    from peft_vit.report import build_table, load_paper, load_records, select_best, to_markdown, write_table
    from select_best import write_selection  # scripts/ is this script's folder

    for i, s in enumerate(p.stages, 1):
        print(f"\n== stage {i}/{len(p.stages)}: {s.name} ({s.n} jobs) — {s.what}", flush=True)
        if s.name in ("grid", "final"):
            _launch(stage_commands(p, s.name, launcher), launcher, s.name)
        elif s.name == "selection":
            col = load_records([p.dirs["grid"]])
            notes: List[str] = []
            sels = select_best(_mine(p, col.records), "val_acc", notes=notes)  # refuses final / test records
            for n in col.issues + notes:
                print(f"note: {n}", file=sys.stderr)
            if missing := sorted({(m, t) for m in p.methods for t in p.tasks} - {(x.method, x.task) for x in sels}):
                raise StageFailed(f"stage selection: no grid records for {missing}; re-run the same command")
            write_selection(sels, p.dirs["selection"], p.seeds, "val_acc")
        else:  # table: make_table --paper on the final records, with this recipe's paper rows
            col = load_records([p.dirs["final"]])
            for n in col.issues:
                print(f"warning: {n} (skipped)", file=sys.stderr)
            paper = load_paper()
            # the recipe's methods; a row that names this preset as its recipe first (one row per method is shown)
            paper[p.spec.benchmark] = sorted((r for r in paper.get(p.spec.benchmark) or [] if r["method"] in p.methods),
                                             key=lambda r: r.get("recipe") != p.spec.preset)
            table = build_table(_mine(p, col.records), p.spec.benchmark, ["last", "max"], paper=True, paper_data=paper)
            files = write_table(table, p.dirs["table"], ["md", "csv"], stem=p.spec.benchmark)
            print(to_markdown(table))
            print("table (protocol final): " + ", ".join(map(str, files)))
            return files[0]
    raise AssertionError("a plan ends with its table")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help=f"one of {', '.join(RECIPES)}")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every job (hydra.* ones for the launcher)")
    ap.add_argument("--tasks", help="comma list (default: every task of the benchmark)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the final runs (default 0,1,2)")
    ap.add_argument("--methods", help="comma list (default: the recipe's)")
    ap.add_argument("--launcher", choices=["local", "slurm"], default="local", help="hydra/launcher (default local)")
    ap.add_argument("--out", default="outputs/reproduce", help="output root (default outputs/reproduce); the "
                    "recipe's stages go to <out>/<recipe>/{grid,selection,final,table}")
    ap.add_argument("--step-s", type=float, default=STEP_S,
                    help=f"assumed seconds per training step of 64 images for the estimate (default {STEP_S})")
    ap.add_argument("--bench", type=Path, help="per-method step times for the estimate: the JSON of "
                    "scripts/benchmark.py --device cuda --out FILE")
    ap.add_argument("--dry-run", action="store_true", help="print the plan only")
    a = ap.parse_intermixed_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        plan = make_plan(a.recipe, split(a.tasks), [int(s) for s in split(a.seeds) or []], split(a.methods),
                         a.overrides, Path(a.out), a.step_s, a.bench)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(show_plan(plan), flush=True)
    if a.dry_run:
        return 0
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        run(plan, a.launcher)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
