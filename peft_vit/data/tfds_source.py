"""tensorflow-datasets -> NOAH's image-folder layout, so one reader serves both sources.

For each task, the registry's tfds builder is read with exactly the registry's split strings
(google-research/task_adaptation; docs/REFERENCE.md §2) and label transform, and written as::

    <root>/<folder>/images/{train800,val200,test}/000000.<png|jpg>
    <root>/<folder>/{train800,val200,train800val200,test}.txt     lines "images/<split>/000000.png <label>"
    <root>/<folder>/tfds_source.json                              builder, version, splits, counts

``train800val200.txt`` is train800's lines followed by val200's: that is what tfds reads for
``train[:800]+<val200>`` (``+`` concatenates in order), without storing the images twice.

Images are written as tfds stored them (the encoded bytes, no re-encoding: PNG stays lossless,
JPEG gets no second compression). Single-channel sources (dsprites, smallnorb) are decoded,
scaled (dsprites x255) and tiled to RGB, then stored as PNG. (NOAH's get_vtab1k.py re-encodes
every image as JPEG at PIL's default quality 75, CIFAR's 32x32 images included.)

TensorFlow is needed to *prepare* image datasets; reading the result needs only PIL.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
from PIL import Image

from ..errors import DownloadUnreachableError

if TYPE_CHECKING:  # a task is read, never built, here: vtab.py imports this module, not the reverse
    from .vtab import Task

log = logging.getLogger(__name__)

WRITTEN_SPLITS = ("train800", "val200", "test")
_FORMATS = {"JPEG": "jpg", "PNG": "png"}


def import_tfds():
    """``tensorflow_datasets``, imported so that it can share the process with PyTorch: Triton
    (loaded by torch._dynamo, torchvision.ops, timm...) segfaults when first imported *after*
    TensorFlow, so it is imported first."""
    try:
        import triton  # noqa: F401
    except Exception:  # no Triton (CPU-only torch): nothing to protect
        pass
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - the tfds extra (requirements.txt installs it)
        raise ImportError("preparing VTAB-1k from tfds needs tensorflow-datasets and TensorFlow: "
                          "pip install -e .[tfds] (or pip install -r requirements.txt)") from e
    return tfds


_tfds = import_tfds


def builder_for(task: Task, data_dir: Optional[str] = None):
    """``tfds.builder(task.tfds_name)``; when the installed tfds no longer has the pinned version
    (oxford_iiit_pet 3.*.* became 4.0.0 in tfds 4.9), fall back to its current version, loudly."""
    tfds = _tfds()
    try:
        return tfds.builder(task.tfds_name, data_dir=data_dir)
    except (AssertionError, ValueError) as e:
        name = task.tfds_name.split(":")[0]
        if "version" not in str(e).lower() or name == task.tfds_name:
            raise
        b = tfds.builder(name, data_dir=data_dir)
        log.warning("%s: tfds %s has no %s; using %s instead (recorded in tfds_source.json)",
                    task.name, tfds.__version__, task.tfds_name, b.info.full_name)
        return b


def manual_instructions(task: Task, builder=None) -> str:
    manual = Path(getattr(builder, "_data_dir_root", None) or "~/tensorflow_datasets") / "downloads" / "manual"
    return (f"tfds cannot download {task.name} ({task.tfds_name}) by itself. Put {task.manual}, "
            f"with <manual_dir> = {manual} (or pass --manual-dir), then run "
            f"python scripts/prepare_vtab.py {task.name} again. Alternatively use the {task.folder}/ folder "
            f"from NOAH's vtab-1k.zip.")


def pending_downloads(builder, download_dir=None) -> list:
    """The URLs ``builder.download_and_prepare`` will fetch: those of the builder's tfds checksums
    file whose file is not in tfds' download dir yet (``<download_dir>/<dataset>/<name>``, or the
    legacy ``<download_dir>/<name>``); none when the builder is prepared already."""
    from tensorflow_datasets.core.download.resource import get_dl_fname

    if builder.is_prepared():
        return []
    downloads = Path(download_dir or Path(builder.data_dir_root) / "downloads")
    pending = []
    for url, info in (builder.url_infos or {}).items():
        name = get_dl_fname(url, info.checksum if info else None)
        if not any((d / name).exists() for d in (downloads / builder.name, downloads)):
            pending.append(url)
    return pending


def unreachable(urls: Iterable[str], timeout: float = 5.0) -> dict:
    """``{host: why}`` for the hosts of ``urls`` that a TCP connection does not reach within
    ``timeout`` seconds (through the proxy the environment names for the URL, as requests would).
    Offline this answers at once (the name does not resolve), where tfds' downloader retries each
    URL ten times with back-off, about three and a half minutes, before it gives up."""
    hosts = {}
    for url in urls:
        u = urllib.parse.urlsplit(url)
        proxy = None if urllib.request.proxy_bypass(u.hostname or "") else urllib.request.getproxies().get(u.scheme)
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}") if proxy else u
        port = target.port or {"https": 443, "ftp": 21}.get(target.scheme, 80)
        hosts.setdefault((target.hostname, port), (u.hostname, f"via proxy {proxy}: " if proxy else ""))
    why = {}
    for (host, port), (name, via) in hosts.items():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            why[name] = f"{via}{type(e).__name__}: {e}" if str(e) else f"{via}{type(e).__name__}"
    return why


def offline_message(task: Task, root: Path, why: dict, builder=None) -> str:
    """One line: the task, the download that cannot be reached, and the way without network."""
    hosts = "; ".join(f"{h} ({w})" for h, w in why.items())
    cannot = f"{task.name}: the download of {task.tfds_name} could not be reached: {hosts}."
    if task.manual:
        return f"{cannot} {manual_instructions(task, builder)}"
    return (f"{cannot} Without network use NOAH's image folders: unzip vtab-1k.zip so that "
            f"{root / task.folder / 'train800.txt'} exists (see datasets/README.md), or run "
            f"python scripts/prepare_vtab.py {task.name} where there is network and copy {task.folder}/ here.")


def _encoded(ex_image) -> tuple:
    """tfds' stored bytes -> (bytes, extension); re-encode as PNG only what PIL cannot identify."""
    data = bytes(ex_image)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
        if fmt in _FORMATS:
            return data, _FORMATS[fmt]
    except Exception:
        pass
    import_tfds()
    import tensorflow as tf  # the rare image PIL does not know: let TF decode it

    arr = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    return _png(arr), "png"


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def gray_to_rgb(image: np.ndarray, scale: int = 1) -> np.ndarray:
    """(H, W[, 1]) single-channel -> (H, W, 3) uint8, multiplied by ``scale`` first (dsprites: 0/1 -> 0/255)."""
    a = np.asarray(image).reshape(image.shape[0], image.shape[1]).astype(np.int64) * scale
    return np.repeat(np.clip(a, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _write_split(builder, task: Task, split: str, out: Path) -> list:
    tfds = _tfds()
    decoders = None if task.gray else {"image": tfds.decode.SkipDecoding()}
    ds = builder.as_dataset(split=task.splits[split], shuffle_files=False, decoders=decoders,
                            read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    lines, t0 = [], time.time()
    for i, ex in enumerate(tfds.as_numpy(ds)):
        label = task.label_fn(ex)
        if not 0 <= label < task.num_classes:
            raise ValueError(f"{task.name} {split} ({task.splits[split]}) example {i}: label {label} "
                             f"outside [0, {task.num_classes}) after {task.label}")
        if task.gray:
            data, ext = _png(gray_to_rgb(ex["image"], task.pixel_scale)), "png"
        else:
            data, ext = _encoded(ex["image"])
        rel = f"images/{split}/{i:06d}.{ext}"
        (out / rel).write_bytes(data)
        lines.append(f"{rel} {label}\n")
    log.info("%s %s: %d images in %.1fs", task.name, split, len(lines), time.time() - t0)
    return lines


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock file, so concurrent runs (a sweep) prepare a task once. The holder removes
    it when done (a waiter that then holds a removed file locks the new one instead), and the
    folders this made for it, when left empty: a failed run leaves nothing behind."""
    import fcntl

    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(path, "a")
        except FileNotFoundError:  # a holder that made the folder removed it in between
            continue
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # the previous holder removed it while this run waited: lock the current file
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()


def is_prepared(folder: Path) -> bool:
    return all((folder / f"{s}.txt").is_file() for s in ("train800", "val200", "train800val200", "test"))


def prepare_task(task: Task, root, data_dir: Optional[str] = None, download: bool = True,
                 overwrite: bool = False, manual_dir: Optional[str] = None) -> Path:
    """Build ``<root>/<task.folder>`` from tfds (downloading the source dataset unless
    ``download=False``). The folder appears only when complete (written aside, then renamed)."""
    root = Path(root).expanduser()
    final = root / task.folder
    with _lock(root / f".{task.folder}.lock"):
        if is_prepared(final) and not overwrite:
            log.info("%s: %s already prepared", task.name, final)
            return final
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} exists but lacks some of train800/val200/train800val200/test.txt; "
                                  "remove it or pass --overwrite")
        builder = builder_for(task, data_dir)
        if download:
            tfds = _tfds()
            config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
            why = unreachable(pending_downloads(builder))
            if why:
                raise DownloadUnreachableError(offline_message(task, root, why, builder))
            try:
                builder.download_and_prepare(download_config=config)
            except Exception as e:
                if task.manual:
                    raise RuntimeError(f"{manual_instructions(task, builder)}\n(tfds said: {e})") from e
                raise
        tmp = root / f".{task.folder}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            lines = {s: _write_split(builder, task, s, tmp) for s in WRITTEN_SPLITS}
            lines["train800val200"] = lines["train800"] + lines["val200"]
            for s, ls in lines.items():
                (tmp / f"{s}.txt").write_text("".join(ls))
            counts = {s: len(ls) for s, ls in lines.items()}
            for s, n in counts.items():
                if n != task.expected_sizes()[s]:
                    log.warning("%s %s: wrote %d images, VTAB-1k expects %d", task.name, s, n, task.expected_sizes()[s])
            (tmp / "tfds_source.json").write_text(json.dumps({
                "task": task.name, "tfds_builder": builder.info.full_name, "requested": task.tfds_name,
                "splits": task.splits, "label": task.label, "counts": counts,
                "expected": task.expected_sizes(), "prepared": time.strftime("%Y-%m-%d %H:%M:%S"),
            }, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: prepared %s", task.name, final)
    return final
