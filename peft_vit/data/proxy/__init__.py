"""The proxy benchmark's data: procedurally generated 32-px images, deterministic from a seed.

* :func:`pretrain_batch` - the pretraining set of ``scripts/proxy_pretrain.py``: 32 classes =
  8 shapes x 4 textures, with hue, position, scale, rotation, count (1-2 copies) and background
  as nuisances (never labels). Hue is a nuisance so that shape, not colour, decides the label.
* :data:`TASKS` - eight transfer tasks in VTAB-1k's spirit, written to disk in NOAH's layout
  (``<root>/<task>/{train800,val200,train800val200,test}.txt`` + ``images/<split>/*.png``) on
  first use and then read like any VTAB-1k folder (source ``proxy``). Their labels are none of
  the pretraining labels: a new shape (the arrow), new textures, sklearn's digits, noise
  spectra, and the nuisances themselves (count, position, orientation, distance).

The package: ``render`` (the scenes), ``pretrain`` (the pretraining stages), ``tasks`` (the eight
generators and their registry), ``writer`` (a task's folder), and here the data source
``proxy`` and its benchmark.

    python -m peft_vit.data.proxy datasets/proxy      # write every task (done lazily otherwise)
"""
from __future__ import annotations
from __future__ import annotations

from .. import DataSplits, PROTOCOLS, register_benchmark, register_source
from .pretrain import NUM_PRETRAIN_CLASSES, PRETRAIN_STAGES, PretrainStage, pretrain_batch, pretrain_classes
from .render import IMG
from .tasks import TASKS, ProxyTask, get_task
from .writer import SIZES, VERSION, generate, write_task

__all__ = ["IMG", "VERSION", "SIZES", "TASKS", "ProxyTask", "get_task", "generate", "write_task", "PretrainStage",
           "PRETRAIN_STAGES", "NUM_PRETRAIN_CLASSES", "pretrain_classes", "pretrain_batch", "build"]

register_benchmark("proxy", "Proxy benchmark", TASKS, backbone="proxy ViT (32 px, width 96)")


@register_source("proxy")
def build(dcfg, protocol: str) -> DataSplits:
    from ..folder import decode_cached, read_list
    from ..memory import InMemoryImages
    from ..transforms import ResizeSquare

    task = get_task(dcfg.task)
    if int(dcfg.num_classes) != task.num_classes:
        raise ValueError(f"dataset.num_classes={dcfg.num_classes} but proxy task {task.name} has {task.num_classes}")
    folder = write_task(task, dcfg.root, int(dcfg.get("seed", 0)))
    resize = ResizeSquare(int(dcfg.img_size), dcfg.get("interpolation", "bicubic"))
    train_split, eval_split = PROTOCOLS[protocol]

    def load(split, flip):
        listing = read_list(folder / f"{split}.txt", task.num_classes)
        images = decode_cached(listing, resize, dcfg.get("cache_dir"), f"proxy-{task.name}-{split}")
        return InMemoryImages(images, listing.labels_tensor(), dcfg.get("normalize", "half"), flip)

    return DataSplits(load(train_split, bool(dcfg.get("flip", False))), load(eval_split, False),
                      train_split, eval_split, task.num_classes)
