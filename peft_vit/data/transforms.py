"""Image transforms shared by every source.

Images are decoded with PIL, converted to RGB whatever their mode (:func:`to_rgb`), geometrically
transformed on the PIL image (so resizing matches NOAH/VPT, which resize PIL images), turned into
uint8 tensors (3, H, W) and normalised last (:class:`Normalize`), so one normalisation serves both
the in-memory training sets and the streamed test sets.

- VTAB-1k (docs/REFERENCE.md §2): resize straight to ``img_size`` x ``img_size``, bicubic, no crop.
- FGVC (docs/REFERENCE.md §3): train = random-resized-crop + flip (HTA) or resize + random crop + flip
  (RLRR/VPT); test = resize the short side to ``img_size * 256 / 224``, centre crop.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigValueError

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # NOAH, FacT, ARC
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # RLRR; Google's ViT preprocessing
    # OpenAI CLIP's preprocessing (configs/model/clip_vitb16.yaml)
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
FGVC_TRAIN_CROPS = ("random_resized", "resize_crop")


def normalization(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    if name not in NORMALIZATIONS:
        raise ConfigValueError(f"dataset.normalize={name!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


class Normalize:
    """uint8 (3, H, W) -> float32 ``(x / 255 - mean) / std``."""

    def __init__(self, name: str):
        mean, std = normalization(name)
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(3, 1, 1) * 255.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def interpolation(name: str) -> int:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation={name!r}; choose one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit greyscale (I;16*, I, F) holding values above 255 is
    rescaled from 0..65535 to 8 bit rather than clipped (PIL's own conversion clips at 255, which
    turns most of a 16-bit image white); values within 0..255 are kept as they are;
    everything else (1, L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, HSV) goes through PIL's
    ``convert("RGB")``, as torchvision's loader does (alpha is dropped, palettes expanded,
    greyscale tiled to three channels)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ResizeSquare:
    """VTAB-1k: resize straight to (size, size), no crop (aspect ratio not kept)."""

    def __init__(self, size: int, interp: str = "bicubic"):
        self.size, self.interp_name, self.interp = int(size), interp, interpolation(interp)

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), self.interp)

    def __repr__(self):
        return f"ResizeSquare({self.size}, {self.interp_name})"  # part of the decode cache key


FGVC_RESIZES = ("short_side", "square")


def fgvc_resize_size(img_size: int) -> int:
    """The size before the crop: 256 for 224 (VPT: 224->256, 384->438, 448->512)."""
    return int(img_size * 256 / 224)


def _fgvc_resize(img_size: int, resize: str, mode):
    """``short_side``: the short side to 256/224 * img_size, aspect kept (VPT's code);
    ``square``: both sides to it, aspect not kept (RLRR's code, ``Resize((256, 256))``)."""
    from torchvision import transforms as T

    n = fgvc_resize_size(img_size)
    if resize not in FGVC_RESIZES:
        raise ConfigValueError(f"dataset.resize={resize!r}; choose one of {', '.join(FGVC_RESIZES)}")
    return T.Resize(n if resize == "short_side" else (n, n), interpolation=mode)


def fgvc_train_transform(img_size: int, crop: str = "random_resized", interp: str = "bilinear",
                         flip: bool = True, resize: str = "short_side") -> Callable:
    """FGVC training: ``random_resized`` = RandomResizedCrop(img_size) + flip (HTA);
    ``resize_crop`` = resize to 256/224 * img_size (``resize``: short side or square) +
    RandomCrop(img_size) + flip (VPT, RLRR). Random draws use torch's global RNG (seeded per item
    by the loop's ``SeededAugment``)."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interp)
    if crop == "random_resized":
        ops = [T.RandomResizedCrop(img_size, interpolation=mode)]
    elif crop == "resize_crop":
        ops = [_fgvc_resize(img_size, resize, mode), T.RandomCrop(img_size)]
    else:
        raise ConfigValueError(f"dataset.train_crop={crop!r}; choose one of {', '.join(FGVC_TRAIN_CROPS)}")
    return T.Compose(ops + ([T.RandomHorizontalFlip()] if flip else []))


def fgvc_eval_transform(img_size: int, interp: str = "bilinear", resize: str = "short_side") -> Callable:
    """FGVC test: resize to 256/224 * img_size (short side or square), centre crop img_size."""
    from torchvision import transforms as T

    return T.Compose([_fgvc_resize(img_size, resize, T.InterpolationMode(interp)), T.CenterCrop(img_size)])


# --------------------------------------------------------------------------- the random flip of decoded sets
# One definition for both data paths: an item of an InMemoryImages (drawn from the global RNG,
# which SeededAugment seeds per item) and a batch on the device (TrainBatches, drawn per item
# from the same seed). Both must agree bit for bit (tests/test_data_device.py).

def flip_draw(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One image's draw of the horizontal flip (p = 0.5): a bool scalar tensor."""
    return torch.rand((), generator=generator) < 0.5


def flip_draws(seeds: Sequence[int]) -> torch.Tensor:
    """For each augmentation seed, the :func:`flip_draw` right after seeding with it."""
    g = torch.Generator()
    return torch.tensor([bool(flip_draw(g.manual_seed(s))) for s in seeds], dtype=torch.bool)


def flip_where(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """``images`` (..., H, W; one image or a batch) flipped left-right where ``flips`` (a bool
    scalar, or one per image) is true: a select, not a masked write (no wait for the device)."""
    return torch.where(flips.view(*flips.shape, *[1] * (images.ndim - flips.ndim)), images.flip(-1), images)
