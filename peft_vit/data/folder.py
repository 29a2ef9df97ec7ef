"""Image lists on disk: NOAH's VTAB-1k layout (and the FGVC json lists, via :class:`Listing`),
read and validated up front, decoded lazily (test sets, in DataLoader workers) or once (the 1k
training sets, in memory plus an optional cache file).

NOAH layout (SPEC §3)::

    <root>/<folder>/{train800,val200,train800val200,test}.txt   lines: "images/<split>/000123.jpg <label>"
    <root>/<folder>/images/<split>/...

Every error names the file and, for a listed image, the list file and line that named it.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import Normalize, to_rgb, to_uint8_tensor

SPLIT_FILES = ("train800", "val200", "train800val200", "test")
CACHE_VERSION = 1  # bump when decoding or resizing changes


class BadImageError(OSError):
    """An image that exists but cannot be decoded."""


@dataclass
class Listing:
    """Absolute image paths and integer labels, with where each came from (for messages)."""

    paths: List[str]
    labels: List[int]
    source: str  # the list/json file
    lines: Optional[List[int]] = None  # line numbers in ``source`` (None: json, cited by key)
    keys: Optional[List[str]] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def labels_tensor(self) -> torch.Tensor:
        return torch.tensor(self.labels, dtype=torch.long)

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} entry {self.keys[i]!r}" if self.keys else self.source

    def __add__(self, other: "Listing") -> "Listing":
        # keep per-item provenance when concatenating lists from different files
        n, m = len(self), len(other)
        return _Concat(self.paths + other.paths, self.labels + other.labels, f"{self.source} + {other.source}",
                       parts=[(0, n, self), (n, n + m, other)])

    def check_exist(self, show: int = 3) -> None:
        missing = [i for i, p in enumerate(self.paths) if not os.path.isfile(p)]
        if missing:
            eg = "; ".join(f"{self.paths[i]} (listed at {self.where(i)})" for i in missing[:show])
            raise FileNotFoundError(f"{len(missing)} of {len(self)} listed images are missing, e.g. {eg}")


@dataclass
class _Concat(Listing):
    parts: list = field(default_factory=list, repr=False)

    def where(self, i: int) -> str:
        for lo, hi, part in self.parts:
            if lo <= i < hi:
                return part.where(i - lo)
        raise IndexError(i)


def read_list(path: Path, num_classes: int, base: Optional[Path] = None) -> Listing:
    """Parse a NOAH list file (``<relative image path> <label>`` per line, blank lines ignored).
    Paths are relative to ``base`` (default: the list's folder). Labels must lie in [0, C)."""
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    paths, labels, lines = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected '<image path> <label>', got {line!r}")
            rel, lab = parts
            try:
                label = int(lab)
            except ValueError:
                raise ValueError(f"{path}:{n}: label {lab!r} is not an integer (line {line!r})") from None
            if not 0 <= label < num_classes:
                raise ValueError(f"{path}:{n}: label {label} outside [0, {num_classes}) (line {line!r}); "
                                 f"is dataset.num_classes right for this folder?")
            paths.append(os.path.join(base, rel))
            labels.append(label)
            lines.append(n)
    if not paths:
        raise ValueError(f"{path} lists no images")
    return Listing(paths, labels, str(path), lines)


def resolve_folder(root: Path, candidates: Sequence[str], expect: str) -> tuple:
    """First ``root/<candidate>`` (case-insensitive) holding file ``expect``.
    Returns (path or None, [candidate dirs that exist but lack ``expect``])."""
    root = Path(root)
    if not root.is_dir():
        return None, []
    by_lower = {}
    for p in sorted(root.iterdir()):
        if p.is_dir():
            by_lower.setdefault(p.name.lower(), p)
    incomplete = []
    for name in dict.fromkeys(candidates):  # ordered, unique
        d = root / name if (root / name).is_dir() else by_lower.get(name.lower())
        if d is None:
            continue
        if (d / expect).is_file():
            return d, incomplete
        incomplete.append(d)
    return None, incomplete


def load_image(path: str, where: str = "") -> Image.Image:
    """Decode one image to RGB; errors name the file and the list line that named it."""
    at = f" (listed at {where})" if where else ""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}{at}") from None
    except Exception as e:  # PIL raises a zoo of types (UnidentifiedImageError, OSError, SyntaxError...)
        raise BadImageError(f"cannot decode image {path}{at}: {type(e).__name__}: {e}") from e


class ImageList(Dataset):
    """Lazy, picklable: decodes on access (in DataLoader workers). ``transform`` maps an RGB PIL
    image to a PIL image (resize/crop/flip); the result is normalised to float (3, H, W)."""

    def __init__(self, listing: Listing, transform: Callable, normalize: str = "imagenet"):
        self.listing = listing
        self.labels = listing.labels_tensor()
        self.transform = transform
        self.normalize = Normalize(normalize)

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, i: int):
        img = self.transform(load_image(self.listing.paths[i], self.listing.where(i)))
        return self.normalize(to_uint8_tensor(img)), self.labels[i]


def _decode_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def decode_all(listing: Listing, transform: Callable, threads: Optional[int] = None) -> torch.Tensor:
    """Decode and transform every image once -> uint8 (N, 3, H, W). PIL releases the GIL while
    decoding and resizing, so a thread pool scales with cores."""
    def one(i):
        return to_uint8_tensor(transform(load_image(listing.paths[i], listing.where(i))))

    threads = threads or _decode_threads()
    if threads > 1 and len(listing) > 1:
        with ThreadPoolExecutor(threads) as pool:
            items = list(pool.map(one, range(len(listing))))
    else:
        items = [one(i) for i in range(len(listing))]
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) != 1:
        raise ValueError(f"images of {listing.source} have different sizes after {transform!r}: {sorted(shapes)[:3]}")
    return torch.stack(items)


def cache_key(listing: Listing, transform: Callable, extra: Iterable = ()) -> str:
    """Hash of what the decoded tensor depends on: the list (paths, labels), each file's size and
    mtime, the transform and the cache version."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{transform!r}|{list(extra)}".encode())
    for p, y in zip(listing.paths, listing.labels):
        st = os.stat(p)
        h.update(f"{p}\t{y}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def decode_cached(listing: Listing, transform: Callable, cache_dir: Optional[str] = None, name: str = "images",
                  threads: Optional[int] = None) -> torch.Tensor:
    """:func:`decode_all`, stored in ``cache_dir/<name>-<hash>.pt`` when ``cache_dir`` is set and
    reloaded from there by any later run with the same list, files and transform."""
    if not cache_dir:
        return decode_all(listing, transform, threads)
    path = Path(cache_dir) / f"{name}-{cache_key(listing, transform)}.pt"
    if path.is_file():
        try:
            images = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and len(images) == len(listing):
                return images
        except Exception:  # a truncated or foreign file: rebuild it
            pass
    images = decode_all(listing, transform, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(images, tmp)
    os.replace(tmp, path)  # atomic: concurrent runs never read a half-written cache
    return images
