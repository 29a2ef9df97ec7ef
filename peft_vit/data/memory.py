"""A decoded image set: decoded and resized once, stored as uint8 (in RAM, or a memory-mapped
cache file), normalised per item here or per batch on the device (:mod:`peft_vit.data.loader`)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .transforms import Normalize, flip_draw, flip_where


class InMemoryImages(Dataset):
    """``images``: uint8 (N, 3, H, W), already at the model's resolution; ``labels``: int64 (N,).
    ``flip``: the random horizontal flip (``transforms.flip_draw``) on access. ``listing``: where the images came from
    (a :class:`~peft_vit.data.folder.Listing`), if from files. The loop does not index it per item:
    :class:`~peft_vit.data.loader.TrainBatches` does the same per batch on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalize: str = "imagenet", flip: bool = False,
                 listing=None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.normalize = Normalize(normalize)
        self.mean, self.std = self.normalize.mean, self.normalize.std  # the loader's, per batch on the device
        self.flip = flip
        self.listing = listing

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.normalize(self.images[i])
        if self.flip:
            x = flip_where(x, flip_draw())
        return x, self.labels[i]
