"""FGVC (docs/REFERENCE.md §3): CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford
Cars, read through the split files of VPT (Jia et al., ECCV 2022; github.com/KMnP/vpt)::

    <root>/<folder>/{train,val,test}.json      each {relative_image_path: class_id}
    <root>/<folder>/<image_dir>/<relative_image_path>

Class ids are remapped to a contiguous range in sorted order. VPT builds that map per split
file; here it is built once from the union of the split files present, so every split agrees
even if one of them lacked a class. Protocol ``tune`` fits train and evaluates val; ``final``
fits train + val and evaluates test.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from ..errors import DataMissingError
from . import DataSplits, PROTOCOLS, register_benchmark, register_source
from .folder import ImageList, Listing, decode_cached, resolve_folder
from .memory import InMemoryImages
from .transforms import fgvc_eval_transform, fgvc_train_transform

SPLITS = ("train", "val", "test")
# the loop's split names -> VPT's json files
PROTOCOL_FILES = {"train800": ("train",), "val200": ("val",), "train800val200": ("train", "val"), "test": ("test",)}
SPLIT_NAMES = {"tune": ("train", "val"), "final": ("train+val", "test")}


@dataclass(frozen=True)
class FGVCSet:
    name: str  # config name: configs/dataset/fgvc/<name>.yaml
    title: str
    num_classes: int
    folder: str  # under the fgvc root
    image_dir: str  # under the folder ("" = the folder itself), as in VPT's loaders
    sizes: Tuple[int, int, int]  # train / val / test, from VPT's paper (not re-counted)
    homepage: str
    aliases: Tuple[str, ...] = ()

    @property
    def folders(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys((self.folder, self.name) + self.aliases))

    def expected_sizes(self) -> Dict[str, int]:
        return dict(zip(SPLITS, self.sizes))


DATASETS: Dict[str, FGVCSet] = {d.name: d for d in [
    FGVCSet("cub", "CUB-200-2011", 200, "CUB_200_2011", "images", (5_394, 600, 5_794),
            "https://www.vision.caltech.edu/datasets/cub_200_2011/", ("cub200", "cub_200", "cub-200-2011")),
    FGVCSet("nabirds", "NABirds", 555, "nabirds", "images", (21_536, 2_393, 24_633),
            "https://dl.allaboutbirds.org/nabirds", ("na_birds",)),
    FGVCSet("flowers", "Oxford Flowers", 102, "OxfordFlower", "", (1_020, 1_020, 6_149),
            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
            ("oxford_flowers", "oxford_flowers102", "flowers102", "oxfordflowers")),
    FGVCSet("dogs", "Stanford Dogs", 120, "Stanford-dogs", "Images", (10_800, 1_200, 8_580),
            "http://vision.stanford.edu/aditya86/ImageNetDogs/", ("stanford_dogs", "stanforddogs")),
    FGVCSet("cars", "Stanford Cars", 196, "Stanford-cars", "", (7_329, 815, 8_041),
            "https://ai.stanford.edu/~jkrause/cars/car_dataset.html", ("stanford_cars", "stanfordcars")),
]}
register_benchmark("fgvc", "FGVC", DATASETS)


def get_dataset(name: str) -> FGVCSet:
    key = str(name).lower()
    for d in DATASETS.values():
        if key in (n.lower() for n in d.folders):
            return d
    raise ValueError(f"unknown FGVC dataset {name!r}; known: {', '.join(DATASETS)}")


def missing_message(ds: FGVCSet, root: Path, need: str, incomplete=()) -> str:
    img = f"{ds.image_dir}/" if ds.image_dir else ""
    lines = [f"FGVC {ds.title}: no folder with {need} under {root} (looked for: {', '.join(ds.folders)})."]
    lines += [f"  {d} exists but has no {need}." for d in incomplete]
    lines += [f"Expected {Path(root) / ds.folder}/{{train,val,test}}.json (VPT's split files) with the images "
              f"under {Path(root) / ds.folder}/{img}. Images: {ds.homepage}; split files: VPT's data "
              "preparation (github.com/KMnP/vpt). python scripts/prepare_fgvc.py --check shows what is missing; "
              "see datasets/README.md."]
    return "\n".join(lines)


def dataset_folder(ds: FGVCSet, root, extra: Tuple[str, ...] = (), need: str = "train.json") -> Path:
    root = Path(root).expanduser()
    folder, incomplete = resolve_folder(root, extra + ds.folders, need)
    if folder is None:
        raise DataMissingError(missing_message(ds, root, need, incomplete))
    return folder


def read_split(folder: Path, split: str) -> Dict[str, object]:
    path = folder / f"{split}.json"
    if not path.is_file():
        raise DataMissingError(f"FGVC split file not found: {path}")
    try:
        anno = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid json: {e}") from None
    if not isinstance(anno, dict) or not anno:
        raise ValueError(f"{path}: expected a non-empty {{relative_image_path: class_id}} object")
    return anno


def _class_key(v):
    """Sort ids numerically when they are integers (1, 2, 10), else as strings."""
    try:
        return 0, int(v), ""
    except (TypeError, ValueError):
        return 1, 0, str(v)


def class_map(annos: Dict[str, Dict[str, object]], num_classes: int, where: str) -> Dict[object, int]:
    ids = sorted({v for a in annos.values() for v in a.values()}, key=_class_key)
    if len(ids) != num_classes:
        raise ValueError(f"{where}: the split files hold {len(ids)} distinct class ids, expected {num_classes}")
    return {v: i for i, v in enumerate(ids)}


def image_base(folder: Path, ds: FGVCSet, anno: Dict[str, object]) -> Path:
    """VPT's image dir, or the folder itself when the json paths already include it."""
    first = next(iter(anno))
    for base in (folder / ds.image_dir, folder):
        if (base / first).is_file():
            return base
    return folder / ds.image_dir


def listings(ds: FGVCSet, root, extra: Tuple[str, ...] = ()) -> Tuple[Path, Dict[str, Listing]]:
    """Every split file present, as Listings with contiguous labels."""
    folder = dataset_folder(ds, root, extra)
    annos = {s: read_split(folder, s) for s in SPLITS if (folder / f"{s}.json").is_file()}
    cmap = class_map(annos, ds.num_classes, f"{folder}/{{{','.join(annos)}}}.json")
    base = image_base(folder, ds, annos["train"])
    out = {}
    for s, anno in annos.items():
        keys = list(anno)
        out[s] = Listing([os.path.join(base, k) for k in keys], [cmap[anno[k]] for k in keys],
                         str(folder / f"{s}.json"), keys=keys)
    return folder, out


@register_source("fgvc")
def build(dcfg, protocol: str) -> DataSplits:
    ds = get_dataset(dcfg.task)
    if int(dcfg.num_classes) != ds.num_classes:
        raise ValueError(f"dataset.num_classes={dcfg.num_classes} but {ds.title} has {ds.num_classes}")
    extra = (dcfg.folder,) if dcfg.get("folder") else ()
    folder, lists = listings(ds, dcfg.root, extra)
    train_split, eval_split = PROTOCOLS[protocol]
    parts = {}
    for split in (train_split, eval_split):
        missing = [s for s in PROTOCOL_FILES[split] if s not in lists]
        if missing:
            raise DataMissingError(f"FGVC split file not found: {folder / (missing[0] + '.json')} "
                                    f"(protocol {protocol} needs {'+'.join(PROTOCOL_FILES[split])})")
        listing = lists[PROTOCOL_FILES[split][0]]
        for s in PROTOCOL_FILES[split][1:]:
            listing = listing + lists[s]
        listing.check_exist()
        parts[split] = listing
    size, interp = int(dcfg.img_size), dcfg.get("interpolation", "bilinear")
    normalize = dcfg.get("normalize", "imagenet")
    resize = dcfg.get("resize", "short_side")
    train_tf = fgvc_train_transform(size, dcfg.get("train_crop", "random_resized"), interp,
                                    flip=bool(dcfg.get("flip", True)), resize=resize)
    train = ImageList(parts[train_split], train_tf, normalize)  # random crops: decoded per item
    eval_tf = fgvc_eval_transform(size, interp, resize)
    if dcfg.get("cache_dir"):  # deterministic: decoded once into the cache, memory-mapped
        images = decode_cached(parts[eval_split], eval_tf, dcfg.cache_dir,
                               f"fgvc-{ds.name}-{eval_split}-{size}px", mmap=True)
        ev = InMemoryImages(images, parts[eval_split].labels_tensor(), normalize, listing=parts[eval_split])
    else:
        ev = ImageList(parts[eval_split], eval_tf, normalize)
    names = SPLIT_NAMES[protocol]
    return DataSplits(train, ev, names[0], names[1], ds.num_classes)


def check(ds: FGVCSet, root, images: bool = True) -> dict:
    """What is on disk for ``ds`` (scripts/prepare_fgvc.py --check, scripts/verify_data.py): the
    folder, per split file the images listed vs VPT's count and missing image files, and errors."""
    root = Path(root).expanduser()
    report = {"dataset": ds.name, "folder": None, "splits": {}, "error": None}
    folder, _ = resolve_folder(root, ds.folders, "train.json")
    if folder is None:
        report["error"] = missing_message(ds, root, "train.json")
    else:
        report["folder"] = folder
        try:
            _, lists = listings(ds, root)
        except (ValueError, FileNotFoundError) as e:
            report["error"], lists = str(e), {}
        for split, expected in ds.expected_sizes().items():
            row = {"expected": expected, "found": None, "missing": None}
            if split in lists:
                row["found"] = len(lists[split])
                if images:
                    row["missing"] = sum(not os.path.isfile(p) for p in lists[split].paths)
            report["splits"][split] = row
    report["ok"] = report["error"] is None and all(
        r["found"] == r["expected"] and not r["missing"] for r in report["splits"].values())
    return report
