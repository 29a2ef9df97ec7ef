"""Data: one entry point, ``build_datasets(cfg)``, dispatching on ``cfg.dataset.source``.

A source module of this package registers a builder with ``@register_source(name)``; the modules
are found and imported on the first request for an unregistered source:
``build(dcfg, protocol) -> DataSplits``. ``protocol`` is ``tune`` (train800 -> val200) or
``final`` (train800val200 -> test). Training datasets may be random (flip, crops); the loop
makes them reproducible by indexing them through :class:`SeededAugment`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Union

import torch
from torch.utils.data import Dataset

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


def build_datasets(cfg) -> DataSplits:
    dcfg = cfg.dataset
    protocol = cfg.protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    source = dcfg.source
    if source not in SOURCES:  # every module of the package, once (none imports TensorFlow at import)
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
    if source not in SOURCES:
        raise KeyError(f"unknown dataset source {source!r}; known: {', '.join(sorted(SOURCES))}")
    splits = SOURCES[source](dcfg, protocol)
    if splits.num_classes != dcfg.num_classes:
        raise ValueError(f"dataset.num_classes={dcfg.num_classes} but the data has {splits.num_classes} classes")
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
