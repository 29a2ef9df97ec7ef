"""Train one (method, dataset) run: `python train.py method=householder dataset=vtab/cifar`.

Multirun sweeps: `python train.py -m method=lora,adapter dataset=vtab/cifar,vtab/dtd`.
"""
import contextlib
from pathlib import Path

import hydra
from omegaconf import DictConfig

from peft_vit.config import check_argv
from peft_vit.fingerprint import register_resolvers
from peft_vit.record import RunContext


def hydra_context() -> RunContext:
    """The run's output dir, experiment preset, sweep name and command-line overrides, from Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweep = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    return RunContext(Path(hc.runtime.output_dir), hc.runtime.choices.get("experiment"), sweep,
                      tuple(hc.overrides.task))


register_resolvers()  # ${peft_vit.fingerprint:} in hydra.run.dir, ${peft_vit.config_groups:} in --help


TRACEBACK = "PEFT_VIT_TRACEBACK"  # set to 1 for the full trace of a known error


def known_error(e: BaseException, log) -> SystemExit:
    """A project error (``peft_vit.errors.PeftVitError``) as one line, on stderr and in train.log."""
    line = f"[peft-vit] {type(e).__name__}: {e}"
    if log is not None:
        log.write(line + "\n")
    return SystemExit(f"{line}\n(the full trace: {TRACEBACK}=1 python train.py ...)")


def remove_if_empty(out_dir: Path, root: Path) -> None:
    """A run that failed before it wrote anything of its own (no checkpoint, record, weights, and
    no lock of a live run) leaves no run dir behind: only Hydra's .hydra/ and train.log are there.
    Parent dirs it leaves empty go too, up to ``root`` (paths.output_root)."""
    import shutil

    if not (out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {".hydra", "train.log"}):
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    root = root.resolve()
    for parent in out_dir.resolve().parents:
        if parent == root or root not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    import os

    from peft_vit.config import recipe_gap
    from peft_vit.engine.logger import terminal_to_log
    from peft_vit.engine.loop import run
    from peft_vit.errors import PeftVitError
    from peft_vit.report.plots import plot_run

    context = hydra_context()
    main_rank = int(os.environ.get("RANK", "0")) == 0
    log_file = context.output_dir / "train.log"  # Hydra's job log; the terminal's lines are copied in
    with (terminal_to_log(log_file) if main_rank else contextlib.nullcontext()) as log:
        try:
            gap = recipe_gap(cfg, context.experiment)  # a preset's table without a row for this method or task
            if gap:
                raise SystemExit(gap)
            record = run(cfg, context)
        except PeftVitError as e:
            if main_rank:
                remove_if_empty(context.output_dir, Path(cfg.paths.output_root))
            if os.environ.get(TRACEBACK, "0") not in ("", "0"):
                raise
            raise known_error(e, log) from None
        except BaseException:
            if main_rank:
                remove_if_empty(context.output_dir, Path(cfg.paths.output_root))
            raise
    if main_rank:
        plot_run(record, context.output_dir)  # the figures of the method's diagnostics (HTA: householder_rank.png)


if __name__ == "__main__":
    check_argv()
    main()
