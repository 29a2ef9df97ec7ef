"""Train one (method, dataset) run: `python train.py method=householder dataset=vtab/cifar`."""
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from peft_vit.engine.loop import run

    return run(cfg)


if __name__ == "__main__":
    main()
