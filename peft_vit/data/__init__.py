"""Data: one entry point, ``build_datasets(cfg)``, dispatching on ``cfg.dataset.source``.

A source module of this package registers a builder with ``@register_source(name)``; the modules
are found and imported on the first request for an unregistered source:
``build(dcfg, protocol) -> DataSplits``. ``protocol`` is ``tune`` (train800 -> val200) or
``final`` (train800val200 -> test). A module with a task registry also declares its benchmark
(``register_benchmark``), which the report reads through :func:`get_benchmark`. Training datasets may be random (flip, crops); the loop
makes them reproducible by indexing them through :class:`SeededAugment`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from ..errors import ConfigValueError

PROTOCOLS = {"tune": ("train800", "val200"), "final": ("train800val200", "test")}


@dataclass
class DataSplits:
    train: Dataset
    eval: Dataset
    train_split: str
    eval_split: str
    num_classes: int


SOURCES: Dict[str, Callable[..., DataSplits]] = {}


def register_source(name: str):
    def deco(fn):
        SOURCES[name] = fn
        return fn
    return deco


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as a source module registers it (:func:`register_benchmark`), for the report:
    its table title, the mean column's title (``{n}``: the number of tasks), the backbone the
    title names, and its task registry (task -> a spec with ``num_classes`` and, where the
    benchmark groups its tasks, ``group``), in column order."""
    name: str
    title: str
    tasks: Mapping[str, Any]
    mean_title: str = "mean"
    backbone: str = "ViT-B/16"


BENCHMARKS: Dict[str, Benchmark] = {}


def register_benchmark(name: str, title: str, tasks: Mapping[str, Any], mean_title: str = "mean",
                       backbone: str = "ViT-B/16") -> None:
    """Declare the benchmark of the records whose ``dataset`` is ``name``, read by the report."""
    BENCHMARKS[name] = Benchmark(name, title, tasks, mean_title, backbone)


def _import_sources() -> None:
    """Every module of the package, once (none imports TensorFlow at import): each registers its
    sources and benchmarks."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_benchmark(name: str) -> Optional[Benchmark]:
    """The registered benchmark of dataset ``name``; None if no source registers one."""
    if name not in BENCHMARKS:
        _import_sources()
    return BENCHMARKS.get(name)


def build_datasets(cfg) -> DataSplits:
    dcfg = cfg.dataset
    protocol = cfg.protocol
    if protocol not in PROTOCOLS:
        raise ConfigValueError(f"protocol={protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    source = dcfg.source
    if source not in SOURCES:
        _import_sources()
    if source not in SOURCES:
        raise KeyError(f"unknown dataset source {source!r}; known: {', '.join(sorted(SOURCES))}")
    splits = SOURCES[source](dcfg, protocol)
    if splits.num_classes != dcfg.num_classes:
        raise ConfigValueError(f"dataset.num_classes={dcfg.num_classes} but the data has {splits.num_classes} classes")
    return splits


class SeededAugment(Dataset):
    """Index a dataset with ``(index, seed)``: its random transforms then draw from a generator
    seeded with ``seed``, whatever process or worker loads the item. This makes augmentation a
    function of (run seed, epoch, position), so a resumed or multi-process run sees exactly the
    images a single uninterrupted run sees."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[index]
        return self.dataset[key]
