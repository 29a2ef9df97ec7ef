"""VTAB-1k: the task registry every VTAB path reads (configs, the folder reader, the tfds
preparation, verify_data), and the ``vtab`` data source.

Split strings and label transforms are those of google-research/task_adaptation (docs/REFERENCE.md §2):
train800 = ``train[:800]``, train800val200 = train800 + val200 (tfds ``+`` concatenates in
order, so its images are train800's followed by val200's).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Tuple

import numpy as np

from ..errors import DataMissingError
from . import DataSplits, PROTOCOLS, register_benchmark, register_source
from .folder import ImageList, decode_cached, read_list, resolve_folder
from .memory import InMemoryImages
from .transforms import ResizeSquare

log = logging.getLogger(__name__)

GROUPS = ("natural", "specialized", "structured")


# ---- label transforms: numpy versions of task_adaptation's TF preprocess functions, applied to
# one tfds example (as produced by tfds.as_numpy). Small classes, so they pickle and print.

@dataclass(frozen=True)
class Field:
    """``ex[key] * num // den`` (integer arithmetic, so dsprites' floor(o / 2.5) = 2o // 5 is exact)."""
    key: str
    num: int = 1
    den: int = 1

    def __call__(self, ex: Mapping) -> int:
        return int(ex[self.key]) * self.num // self.den

    def __str__(self):
        if self.num == self.den == 1:
            return self.key
        return f"{self.key} // {self.den}" if self.num == 1 else f"floor({self.key} * {self.num} / {self.den})"


@dataclass(frozen=True)
class CountObjects:
    """Number of objects minus ``offset`` (CLEVR: 3..10 objects -> 0..7)."""
    offset: int = 3

    def __call__(self, ex: Mapping) -> int:
        return len(ex["objects"]["size"]) - self.offset

    def __str__(self):
        return f"#objects - {self.offset}"


def _bin(dist: float, thresholds: Tuple[float, ...]) -> int:
    """task_adaptation's ``reduce_max(where(thrs - dist < 0))``: the last i with thrs[i] < dist."""
    below = np.flatnonzero(np.asarray(thresholds) < dist)
    if below.size == 0:
        raise ValueError(f"distance {dist} is below the first threshold {thresholds[0]}")
    return int(below[-1])


@dataclass(frozen=True)
class ClosestObjectBin:
    """CLEVR: bin of the smallest depth (``pixel_coords[:, 2]``) among the objects."""
    thresholds: Tuple[float, ...] = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)

    def __call__(self, ex: Mapping) -> int:
        return _bin(float(np.min(np.asarray(ex["objects"]["pixel_coords"])[:, 2])), self.thresholds)

    def __str__(self):
        return f"min z of pixel_coords, bins {list(self.thresholds)}"


@dataclass(frozen=True)
class ClosestVehicleBin:
    """KITTI: bin of the nearest vehicle's depth (``location[:, 2]`` of objects with type < 3:
    Car, Van, Truck); no vehicle counts as 1000 m, i.e. the last bin."""
    thresholds: Tuple[float, ...] = (-100.0, 8.0, 20.0, 999.0)
    max_type: int = 3
    none: float = 1000.0

    def __call__(self, ex: Mapping) -> int:
        obj = ex["objects"]
        z = np.asarray(obj["location"], dtype=np.float64).reshape(-1, 3)[:, 2]
        z = z[np.asarray(obj["type"]).reshape(-1) < self.max_type]
        return _bin(float(min(z.min(initial=self.none), self.none)), self.thresholds)

    def __str__(self):
        return f"closest vehicle (type<{self.max_type}) z, bins {list(self.thresholds)}, no vehicle -> last"


@dataclass(frozen=True)
class Task:
    name: str  # config name: configs/dataset/vtab/<name>.yaml
    group: str
    num_classes: int
    folder: str  # NOAH's folder name under the vtab-1k root
    tfds_name: str  # tfds builder (with version pattern), as in task_adaptation
    val200: str
    test: str
    test_size: int
    flip: bool  # RLRR's per-task horizontal flip (RLRR's released configs; docs/REFERENCE.md §4)
    label_fn: Callable = Field("label")
    aliases: Tuple[str, ...] = ()
    gray: bool = False  # single-channel source: tile to RGB
    pixel_scale: int = 1  # multiply pixels first (dsprites stores 0/1)
    manual: str = ""  # what tfds needs downloaded by hand, if anything

    @property
    def splits(self) -> Dict[str, str]:
        train800 = "train[:800]"
        return {"train800": train800, "val200": self.val200,
                "train800val200": f"{train800}+{self.val200}", "test": self.test}

    @property
    def label(self) -> str:
        return str(self.label_fn)

    @property
    def folders(self) -> Tuple[str, ...]:
        """Folder names accepted under the root, canonical first."""
        return tuple(dict.fromkeys((self.folder, self.name) + self.aliases))

    def expected_sizes(self) -> Dict[str, int]:
        return {"train800": 800, "val200": 200, "train800val200": 1000, "test": self.test_size}


_RESISC = ("the NWPU-RESISC45 archive (NWPU-RESISC45.rar, linked from tfds' resisc45 page), "
           "extracted so that <manual_dir>/NWPU-RESISC45/<class>/*.jpg exist")
_RETINO = ("Kaggle's diabetic-retinopathy-detection data (kaggle.com/c/diabetic-retinopathy-detection): "
           "unpack train.zip.* into <manual_dir>/train/, test.zip.* into <manual_dir>/test/, sample.zip into "
           "<manual_dir>/sample/, and trainLabels.csv(.zip) as <manual_dir>/trainLabels.csv")

_T = Task
TASKS: Dict[str, Task] = {t.name: t for t in [
    # natural
    _T("cifar", "natural", 100, "cifar", "cifar100:3.*.*", "train[45000:45200]", "test", 10_000, False,
       aliases=("cifar100", "cifar-100", "cifar_100")),
    _T("caltech101", "natural", 102, "caltech101", "caltech101:3.*.*", "train[2754:2954]", "test", 6_084, False,
       aliases=("caltech", "caltech_101", "caltech-101", "caltech_102")),
    _T("dtd", "natural", 47, "dtd", "dtd:3.*.*", "validation[:200]", "test", 1_880, True,
       aliases=("describable_textures",)),
    _T("flowers", "natural", 102, "oxford_flowers102", "oxford_flowers102:2.*.*", "validation[:200]", "test", 6_149,
       False, aliases=("flowers102", "oxford_flowers", "oxford_flower", "flower102")),
    _T("pets", "natural", 37, "oxford_iiit_pet", "oxford_iiit_pet:3.*.*", "train[2944:3144]", "test", 3_669, True,
       aliases=("oxford_pet", "oxford_pets", "oxford_iiit_pets", "oxford-iiit-pet", "pet")),
    _T("svhn", "natural", 10, "svhn", "svhn_cropped:3.*.*", "train[65931:66131]", "test", 26_032, False,
       aliases=("svhn_cropped",)),
    _T("sun397", "natural", 397, "sun397", "sun397/tfds:4.*.*", "validation[:200]", "test", 21_750, False,
       aliases=("sun", "sun_397")),
    # specialized
    _T("camelyon", "specialized", 2, "patch_camelyon", "patch_camelyon:2.*.*", "validation[:200]", "test", 32_768,
       True, aliases=("pcam", "patchcamelyon")),
    _T("eurosat", "specialized", 10, "eurosat", "eurosat/rgb:2.*.*", "train[16200:16400]", "train[21600:]", 5_400,
       True, aliases=("eurosat_rgb",)),
    _T("resisc45", "specialized", 45, "resisc45", "resisc45:3.*.*", "train[18900:19100]", "train[25200:]", 6_300,
       False, aliases=("resisc", "nwpu_resisc45"), manual=_RESISC),
    _T("retinopathy", "specialized", 5, "diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*",
       "validation[:200]", "test", 42_670, True,
       aliases=("diabetic_retinopathy_detection", "diabetic_retinopathy_btgraham"), manual=_RETINO),
    # structured
    _T("clevr_count", "structured", 8, "clevr_count", "clevr:3.*.*", "train[63000:63200]", "validation", 15_000,
       True, label_fn=CountObjects(3), aliases=("clevr_count_all", "clevr-count", "clevr_counting")),
    _T("clevr_dist", "structured", 6, "clevr_dist", "clevr:3.*.*", "train[63000:63200]", "validation", 15_000,
       True, label_fn=ClosestObjectBin(), aliases=("clevr_closest_object_distance", "clevr_distance", "clevr-dist")),
    _T("dmlab", "structured", 6, "dmlab", "dmlab:2.0.1", "validation[:200]", "test", 22_735, True),
    _T("kitti", "structured", 4, "kitti", "kitti:3.*.*", "validation[:200]", "test", 711, True,
       label_fn=ClosestVehicleBin(), aliases=("kitti_distance", "kitti_closest_vehicle_distance", "kitti_dist")),
    _T("dsprites_loc", "structured", 16, "dsprites_loc", "dsprites:2.*.*", "train[589824:590024]", "train[663552:]",
       73_728, False, label_fn=Field("label_x_position", 1, 2), gray=True, pixel_scale=255,
       aliases=("dsprites_location", "dsprites_x_position", "dsprites_label_x_position", "dsprites-loc")),
    _T("dsprites_ori", "structured", 16, "dsprites_ori", "dsprites:2.*.*", "train[589824:590024]", "train[663552:]",
       73_728, False, label_fn=Field("label_orientation", 2, 5), gray=True, pixel_scale=255,
       aliases=("dsprites_orientation", "dsprites_label_orientation", "dsprites-ori")),
    _T("smallnorb_azi", "structured", 18, "smallnorb_azi", "smallnorb:2.*.*", "test[:200]", "test[50%:]", 12_150,
       False, label_fn=Field("label_azimuth"), gray=True,
       aliases=("smallnorb_azimuth", "smallnorb_label_azimuth", "smallnorb-azi")),
    _T("smallnorb_ele", "structured", 9, "smallnorb_ele", "smallnorb:2.*.*", "test[:200]", "test[50%:]", 12_150,
       True, label_fn=Field("label_elevation"), gray=True,
       aliases=("smallnorb_elevation", "smallnorb_label_elevation", "smallnorb-ele")),
]}
register_benchmark("vtab", "VTAB-1k", TASKS, mean_title="mean{n}")
del _T


def get_task(name: str) -> Task:
    """A task by config name, NOAH folder name or alias (case-insensitive)."""
    key = str(name).lower()
    for t in TASKS.values():
        if key in (n.lower() for n in t.folders):
            return t
    known = ", ".join(f"{t.name} ({t.group})" for t in TASKS.values())
    raise ValueError(f"unknown VTAB-1k task {name!r}; known tasks: {known}")


def missing_message(task: Task, root: Path, incomplete=(), need: str = "train800.txt") -> str:
    looked = ", ".join(task.folders)
    msg = [f"VTAB-1k task {task.name!r}: no folder with {need} under {root} (looked for: {looked})."]
    for d in incomplete:
        msg.append(f"  {d} exists but has no {need}.")
    msg += [
        "Get the data either way:",
        f"  1. NOAH's image folders (vtab-1k.zip, made by NOAH's data/vtab-source/get_vtab1k.py): unzip so that "
        f"{Path(root) / task.folder / need} exists, or point dataset.root at your vtab-1k folder;",
        f"  2. build it from tensorflow-datasets: python scripts/prepare_vtab.py {task.name} --root {root}"
        " (or run with dataset.prepare_if_missing=true).",
    ]
    if task.manual:
        msg.append(f"  tfds cannot download {task.name} itself; it needs {task.manual}.")
    msg.append("See datasets/README.md.")
    return "\n".join(msg)


def task_folder(task: Task, root, extra: Tuple[str, ...] = (), prepare: bool = False, tfds_dir=None,
                need: str = "train800.txt") -> Path:
    """The task's folder under ``root``; prepared from tfds first when missing and ``prepare``."""
    root = Path(root).expanduser()
    folder, incomplete = resolve_folder(root, extra + task.folders, need)
    if folder is None and prepare:
        from .tfds_source import import_tfds, prepare_task

        try:
            import_tfds()
        except ImportError:
            log.warning("dataset.prepare_if_missing: tensorflow-datasets is not installed")
        else:
            try:
                prepare_task(task, root, data_dir=tfds_dir)
            except Exception as e:
                raise DataMissingError(f"{missing_message(task, root, incomplete, need)}\n"
                                        f"dataset.prepare_if_missing: preparing from tfds failed: "
                                        f"{type(e).__name__}: {e}") from e
            folder, incomplete = resolve_folder(root, extra + task.folders, need)
    if folder is None:
        raise DataMissingError(missing_message(task, root, incomplete, need))
    return folder


def resolve_flip(flip, task_flip: bool) -> bool:
    """``dataset.flip``: true | false | rlrr (RLRR's per-task choice from the registry)."""
    if isinstance(flip, str):
        if flip.lower() == "rlrr":
            return task_flip
        if flip.lower() in ("true", "false"):
            return flip.lower() == "true"
        raise ValueError(f"dataset.flip={flip!r}; choose true, false or rlrr")
    return bool(flip)


@register_source("vtab")
def build(dcfg, protocol: str) -> DataSplits:
    task = get_task(dcfg.task)
    if int(dcfg.num_classes) != task.num_classes:
        raise ValueError(f"dataset.num_classes={dcfg.num_classes} but VTAB-1k {task.name} has {task.num_classes}")
    train_split, eval_split = PROTOCOLS[protocol]
    extra = (dcfg.folder,) if dcfg.get("folder") else ()
    folder = task_folder(task, dcfg.root, extra, bool(dcfg.get("prepare_if_missing", False)),
                         dcfg.get("tfds_dir"), need=f"{train_split}.txt")
    size = int(dcfg.img_size)
    resize = ResizeSquare(size, dcfg.get("interpolation", "bicubic"))
    normalize = dcfg.get("normalize", "imagenet")
    lists = {s: read_list(folder / f"{s}.txt", task.num_classes) for s in (train_split, eval_split)}
    for s, listing in lists.items():
        listing.check_exist()
        if len(listing) != task.expected_sizes()[s]:
            log.warning("%s: %d images listed, VTAB-1k has %d", listing.source, len(listing), task.expected_sizes()[s])

    cache = dcfg.get("cache_dir")

    def decoded(split, flip, mmap=False):
        images = decode_cached(lists[split], resize, cache, f"{task.name}-{split}-{size}px", mmap=mmap)
        return InMemoryImages(images, lists[split].labels_tensor(), normalize, flip, lists[split])

    train = decoded(train_split, resolve_flip(dcfg.get("flip", False), task.flip))
    # test sets (up to 73,728 images, 11 GB at 224 px) are memory-mapped from the cache; without
    # a cache they stream from disk (val200 is small: decoded into memory either way)
    ev = decoded(eval_split, False, mmap=True) if cache or eval_split != "test" \
        else ImageList(lists[eval_split], resize, normalize)
    return DataSplits(train, ev, train_split, eval_split, task.num_classes)


def check(task: Task, root, images: bool = True) -> dict:
    """What is on disk for ``task`` (for scripts/verify_data.py): the folder found, and per split
    the images listed vs VTAB-1k's count, missing image files and any list error."""
    folder, incomplete = resolve_folder(Path(root).expanduser(), task.folders, "train800val200.txt")
    if folder is None:
        folder, _ = resolve_folder(Path(root).expanduser(), task.folders, "test.txt")
    report = {"task": task.name, "folder": folder, "incomplete": incomplete, "splits": {}}
    for split, expected in task.expected_sizes().items():
        row = {"expected": expected, "found": None, "missing": None, "error": None}
        if folder is not None and (folder / f"{split}.txt").is_file():
            try:
                listing = read_list(folder / f"{split}.txt", task.num_classes)
                row["found"] = len(listing)
                if images:
                    row["missing"] = sum(not Path(p).is_file() for p in listing.paths)
            except ValueError as e:
                row["error"] = str(e)
        report["splits"][split] = row
    report["ok"] = all(r["found"] == r["expected"] and not r["missing"] and not r["error"]
                       for r in report["splits"].values())
    return report
