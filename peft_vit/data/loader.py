"""Batches for the training loop, already on the device.

Decoded uint8 sets (:class:`InMemoryImages`: the 1k training sets, val200, and test sets from
the decode cache) are served without DataLoader workers: the training set goes to the device
once, and each batch is gathered, normalised and flipped there; evaluation reads the (possibly
memory-mapped) set in large slices, copying the next while the model runs. Sets that must be
decoded per item (FGVC's random crops, test sets without a cache) go through a DataLoader.

Either way a training batch is a function of (seed, epoch, position): :class:`GlobalBatchSampler`
fixes the images, their order and one augmentation seed per item; both paths draw and apply the
flip with the same functions (``transforms.flip_draw`` / ``flip_where``), so they give the same
batches, bit for bit on CPU.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigValueError
from . import SeededAugment
from .memory import InMemoryImages
from .transforms import flip_draws, flip_where

Batch = Tuple[torch.Tensor, torch.Tensor]


class GlobalBatchSampler(Sampler[List]):
    """Batches of a global size ``batch_size`` from a per-epoch permutation seeded with
    (seed, epoch); rank r of w takes its contiguous share of each global batch. Items are
    ``(index, augmentation seed)`` pairs for :class:`SeededAugment`."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, drop_last: bool = True):
        if batch_size % world:
            raise ConfigValueError(f"trainer.batch_size={batch_size} is not divisible by {world} processes")
        if drop_last and n < batch_size:
            raise ConfigValueError(f"{n} training images < trainer.batch_size={batch_size} with drop_last")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.drop_last = drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[List]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        aug = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        for b in range(self.start, len(self)):
            batch = list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.n)))
            share = math.ceil(len(batch) / self.world)
            mine = batch[self.rank * share:(self.rank + 1) * share]
            yield [(perm[i], aug[i]) for i in mine]


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 ``(x - mean) / std``, as :class:`InMemoryImages` does per
    item (the same two roundings, in place on one new tensor)."""
    return x.float().sub_(mean).div_(std)


class TrainBatches:
    """The training batches of one process: ``epoch(e, start_step)`` yields ``(x, y)`` on
    ``device`` for steps ``start_step..`` of epoch ``e``. ``len()`` is the steps per epoch."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world: int = 1, drop_last: bool = True, num_workers: int = 0, worker_init_fn=None):
        self.sampler = GlobalBatchSampler(len(dataset), batch_size, seed, rank, world, drop_last)
        self.device = torch.device(device)
        self.on_device = isinstance(dataset, InMemoryImages)
        if self.on_device:  # once; then every batch is gathered, normalised and flipped on the device
            self.images, self.labels = dataset.images.to(self.device), dataset.labels.to(self.device)
            self.mean, self.std = dataset.mean.to(self.device), dataset.std.to(self.device)
            self.flip = dataset.flip
        else:  # decoded per item by workers; each item's random transform seeded by the sampler.
            # the loader's own seeds come from its generator, never from the global RNG (which
            # drives dropout and must resume exactly)
            self.loader = DataLoader(SeededAugment(dataset), batch_sampler=self.sampler, num_workers=num_workers,
                                     pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
                                     generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init_fn)

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start_step)
        if not self.on_device:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        batches = list(self.sampler)
        items = [it for b in batches for it in b]
        # one host-to-device copy per epoch for the indices and flips of all its batches
        index = torch.tensor([i for i, _ in items], dtype=torch.long).to(self.device, non_blocking=True)
        flips = flip_draws([s for _, s in items]).to(self.device, non_blocking=True) if self.flip else None
        lo = 0
        for b in batches:
            idx = index[lo:lo + len(b)]
            x = self.images[idx]  # uint8: flipping before normalising moves a quarter of the bytes
            if flips is not None:
                x = flip_where(x, flips[lo:lo + len(b)])
            lo += len(b)
            yield normalize(x, self.mean, self.std), self.labels[idx]


class EvalBatches:
    """``rank``'s share of an evaluation set (items rank, rank + world, ...) in batches of
    ``batch_size`` on ``device``. Counts the images and seconds of the evaluations that the
    loop reports through :meth:`timed` (``images_per_s``)."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                 num_workers: int = 0, worker_init_fn=None):
        self.device, self.batch_size = torch.device(device), batch_size
        self.decoded = isinstance(dataset, InMemoryImages)
        self.images_seen, self.seconds = 0, 0.0
        if self.decoded:  # RAM or a memory-mapped cache file; stays on the host
            self.images = dataset.images[rank::world]
            self.labels = dataset.labels[rank::world].to(self.device)
            self.mean, self.std = dataset.mean.to(self.device), dataset.std.to(self.device)
        else:
            sub = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
            self.loader = DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                     pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
                                     worker_init_fn=worker_init_fn)

    def _read(self, lo: int) -> torch.Tensor:
        part = self.images[lo:lo + self.batch_size]
        if self.device.type != "cuda":
            return part.clone()
        return torch.empty(part.shape, dtype=torch.uint8, pin_memory=True).copy_(part)

    def __iter__(self) -> Iterator[Batch]:
        if not self.decoded:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        starts = range(0, len(self.images), self.batch_size)
        with ThreadPoolExecutor(1) as reader:  # reads (pages in) the next slice while the model runs
            nxt = reader.submit(self._read, 0) if len(starts) else None
            for lo in starts:
                part = nxt.result()
                if lo + self.batch_size < len(self.images):
                    nxt = reader.submit(self._read, lo + self.batch_size)
                x = normalize(part.to(self.device, non_blocking=True), self.mean, self.std)
                yield x, self.labels[lo:lo + self.batch_size]

    def timed(self, images: int, seconds: float) -> None:
        self.images_seen += images
        self.seconds += seconds

    @property
    def images_per_s(self) -> float:
        return round(self.images_seen / self.seconds, 2) if self.seconds else 0.0
