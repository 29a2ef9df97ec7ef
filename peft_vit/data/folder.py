"""Image lists on disk: NOAH's VTAB-1k layout (and the FGVC json lists, via :class:`Listing`),
read and validated up front, then decoded once per (list, transform) by a pool of processes into
a uint8 cache file that later runs reuse (the 1k training sets are read into memory, test sets
memory-mapped), or, without a cache directory, decoded per run (training sets) or lazily in
DataLoader workers (test sets).

NOAH layout (github.com/ZhangYuanhan-AI/NOAH; docs/REFERENCE.md §2)::

    <root>/<folder>/{train800,val200,train800val200,test}.txt   lines: "images/<split>/000123.jpg <label>"
    <root>/<folder>/images/<split>/...

Every error names the file and, for a listed image, the list file and line that named it.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import multiprocessing as mp
import os
import socket
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError, DataMissingError, PeftVitError
from .transforms import Normalize, to_rgb, to_uint8_tensor

SPLIT_FILES = ("train800", "val200", "train800val200", "test")
CACHE_VERSION = 2  # bump when decoding, resizing or the file format changes


class BadImageError(PeftVitError, OSError):
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
            raise DataMissingError(f"{len(missing)} of {len(self)} listed images are missing, e.g. {eg}")


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
        raise DataMissingError(f"list file not found: {path}")
    paths, labels, lines = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{path}:{n}: expected '<image path> <label>', got {line!r}")
            rel, lab = parts
            try:
                label = int(lab)
            except ValueError:
                raise DataError(f"{path}:{n}: label {lab!r} is not an integer (line {line!r})") from None
            if not 0 <= label < num_classes:
                raise DataError(f"{path}:{n}: label {label} outside [0, {num_classes}) (line {line!r}); "
                                 f"is dataset.num_classes right for this folder?")
            paths.append(os.path.join(base, rel))
            labels.append(label)
            lines.append(n)
    if not paths:
        raise DataError(f"{path} lists no images")
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
        raise DataMissingError(f"image not found: {path}{at}") from None
    except Exception as e:  # PIL raises a zoo of types (UnidentifiedImageError, OSError, SyntaxError...)
        empty = " (an empty file)" if os.path.isfile(path) and os.path.getsize(path) == 0 else ""
        raise BadImageError(f"cannot decode image {path}{at}{empty}: {type(e).__name__}: {e}") from e


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


def decode_workers() -> int:
    """Every core this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def decode_one(listing: Listing, transform: Callable, i: int) -> np.ndarray:
    """Image ``i`` decoded, transformed -> uint8 array (3, H, W)."""
    img = transform(load_image(listing.paths[i], listing.where(i)))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


_JOB: tuple = ()  # (listing, transform) in a decoding worker process


def _init_worker(listing: Listing, transform: Callable) -> None:
    global _JOB
    _JOB = (listing, transform)


def _decode_range(span) -> Tuple[np.ndarray, List[str]]:
    """Images ``lo..hi``, and the messages of those that cannot be decoded (their slots stay empty)."""
    listing, transform = _JOB
    lo, hi, shape = span
    out, bad = np.empty((hi - lo,) + shape, dtype=np.uint8), []
    for k, i in enumerate(range(lo, hi)):
        try:
            a = decode_one(listing, transform, i)
        except BadImageError as e:
            bad.append(str(e))
            continue
        if a.shape != shape:
            raise ValueError(f"image {listing.paths[i]} (listed at {listing.where(i)}) is {a.shape} after "
                             f"{transform!r}, the first image of {listing.source} is {shape}: every image of a "
                             f"list must have the same size after the transform")
        out[k] = a
    return out, bad


BAD_IMAGES_FIX = ("replace or re-download them, or remove their lines from the list; "
                  "python scripts/verify_data.py <benchmark> --decode checks every image without training")


def bad_images_error(listing: Listing, bad: List[str]) -> BadImageError:
    """One error for every image of ``listing`` that cannot be decoded, each with its list line."""
    return BadImageError(f"{len(bad)} of {len(listing)} images of {listing.source} cannot be decoded; "
                         f"{BAD_IMAGES_FIX}:\n  " + "\n  ".join(bad))


def decode_all(listing: Listing, transform: Callable, workers: Optional[int] = None,
               out: Optional[Callable[[tuple], np.ndarray]] = None) -> np.ndarray:
    """Decode and transform every image once -> uint8 (N, 3, H, W), written into ``out(shape)``
    (e.g. a memory-mapped file; default a new array). Large lists are decoded by a pool of
    processes, one per core (``workers``), in chunks."""
    n, workers = len(listing), workers or decode_workers()
    bad: List[str] = []
    for start in range(n):  # the first image that decodes sets the shape
        try:
            first = decode_one(listing, transform, start)
            break
        except BadImageError as e:
            bad.append(str(e))
    else:
        raise bad_images_error(listing, bad)
    shape = (n,) + first.shape
    arr = out(shape) if out else np.empty(shape, np.uint8)
    arr[start] = first
    chunk = max(16, min(256, -(-n // (4 * workers))))
    spans = [(lo, min(lo + chunk, n), first.shape) for lo in range(start + 1, n, chunk)]
    if workers > 1 and n > 64 and spans:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(min(workers, len(spans)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(listing, transform)) as pool:
            for (lo, hi, _), (block, errors) in zip(spans, pool.map(_decode_range, spans)):
                arr[lo:hi], bad = block, bad + errors
    else:
        _init_worker(listing, transform)
        for lo, hi, shape in spans:
            arr[lo:hi], errors = _decode_range((lo, hi, shape))
            bad += errors
    if bad:  # every bad image of the list at once, each with its list line
        raise bad_images_error(listing, bad)
    return arr


def cache_key(listing: Listing, transform: Callable, extra: Iterable = ()) -> str:
    """Hash of what the decoded images depend on: the list (paths, labels, order), each file's
    size and mtime, the transform and the cache version."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{transform!r}|{list(extra)}".encode())
    for p, y in zip(listing.paths, listing.labels):
        st = os.stat(p)
        h.update(f"{p}\t{y}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_path(listing: Listing, transform: Callable, cache_dir, name: str = "images") -> Path:
    return Path(cache_dir).expanduser() / f"{name}-{cache_key(listing, transform)}.npy"


def _read_cache(path: Path, n: int, mmap: bool) -> Optional[np.ndarray]:
    try:
        a = np.load(path, mmap_mode="c" if mmap else None)
    except (OSError, ValueError):  # absent, truncated or foreign: (re)build it
        return None
    return a if a.dtype == np.uint8 and a.ndim == 4 and a.shape[:2] == (n, 3) else None


def _remove_dead_writes(path: Path) -> None:
    """Temporary files of ``path`` left by killed runs of this host (up to 11 GB each)."""
    prefix = f"{path.name}.tmp-{socket.gethostname()}-"
    for t in path.parent.glob(glob.escape(prefix) + "*"):
        pid = t.name[len(prefix):]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                t.unlink(missing_ok=True)
            except PermissionError:  # alive, another user's
                pass


def decode_cached(listing: Listing, transform: Callable, cache_dir: Optional[str] = None, name: str = "images",
                  mmap: bool = False, workers: Optional[int] = None) -> torch.Tensor:
    """:func:`decode_all` as a uint8 tensor (N, 3, H, W). With ``cache_dir`` it is stored in
    ``cache_dir/<name>-<hash>.npy`` (:func:`cache_key`) and read from there by every later run
    with the same list, files and transform; ``mmap``: memory-map the file instead of reading it
    into RAM (large test sets). The file is written under a temporary name and renamed when
    complete, so a killed run never leaves a partial cache that a later run would read. Processes
    that need the same missing entry at once (the ranks of a DDP run, sweep jobs on one node) take
    turns on ``<entry>.lock``: one decodes, the others wait and read its file."""
    if not cache_dir:
        return torch.from_numpy(decode_all(listing, transform, workers))
    path = cache_path(listing, transform, cache_dir, name)
    images = _read_cache(path, len(listing), mmap)
    if images is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when its holder dies
            images = _read_cache(path, len(listing), mmap)  # built while this process waited?
            if images is None:
                _build_cache(listing, transform, workers, path)
                images = _read_cache(path, len(listing), mmap)
    return torch.from_numpy(images)


def _build_cache(listing: Listing, transform: Callable, workers: Optional[int], path: Path) -> None:
    _remove_dead_writes(path)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        arr = decode_all(listing, transform, workers,
                         out=lambda shape: np.lib.format.open_memmap(tmp, "w+", np.uint8, shape))
        arr.flush()
        del arr
        os.replace(tmp, path)  # atomic: a reader without the lock never sees a half-written cache
    finally:
        tmp.unlink(missing_ok=True)
