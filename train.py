"""Train one (method, dataset) run: `python train.py method=householder dataset=vtab/cifar`.

Multirun sweeps: `python train.py -m method=lora,adapter dataset=vtab/cifar,vtab/dtd`.
"""
import hydra
from omegaconf import DictConfig

from peft_vit.config import check_argv


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from peft_vit.engine.loop import run

    run(cfg)


if __name__ == "__main__":
    check_argv()
    main()
