"""Train one (method, dataset) run: `python train.py method=householder dataset=vtab/cifar`.

Multirun sweeps: `python train.py -m method=lora,adapter dataset=vtab/cifar,vtab/dtd`.
"""
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


register_resolvers()  # ${peft_vit.fingerprint:} in hydra.run.dir


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    import os

    from peft_vit.config import recipe_gap
    from peft_vit.engine.loop import run
    from peft_vit.report.plots import plot_run

    context = hydra_context()
    gap = recipe_gap(cfg, context.experiment)  # a preset's table without a row for this method or task
    if gap:
        raise SystemExit(gap)
    record = run(cfg, context)
    if int(os.environ.get("RANK", "0")) == 0:
        plot_run(record, context.output_dir)  # the figures of the method's diagnostics (HTA: householder_rank.png)


if __name__ == "__main__":
    check_argv()
    main()
