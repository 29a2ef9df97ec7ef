"""The VTAB-1k task registry (task_adaptation's splits) and the FGVC registry (VPT's sizes) against
docs/REFERENCE.md §2/§3 (tables copied here by hand, independently of the code), and the 24 dataset
configs against the registries."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import CONFIGS, compose
from peft_vit.data import fgvc, vtab

# docs/REFERENCE.md §2: task -> (folder, tfds builder, C, val200, test, test size, group, RLRR flip)
REFERENCE_VTAB = {
    "cifar": ("cifar", "cifar100:3.*.*", 100, "train[45000:45200]", "test", 10_000, "natural", False),
    "caltech101": ("caltech101", "caltech101:3.*.*", 102, "train[2754:2954]", "test", 6_084, "natural", False),
    "dtd": ("dtd", "dtd:3.*.*", 47, "validation[:200]", "test", 1_880, "natural", True),
    "flowers": ("oxford_flowers102", "oxford_flowers102:2.*.*", 102, "validation[:200]", "test", 6_149, "natural", False),
    "pets": ("oxford_iiit_pet", "oxford_iiit_pet:3.*.*", 37, "train[2944:3144]", "test", 3_669, "natural", True),
    "svhn": ("svhn", "svhn_cropped:3.*.*", 10, "train[65931:66131]", "test", 26_032, "natural", False),
    "sun397": ("sun397", "sun397/tfds:4.*.*", 397, "validation[:200]", "test", 21_750, "natural", False),
    "camelyon": ("patch_camelyon", "patch_camelyon:2.*.*", 2, "validation[:200]", "test", 32_768, "specialized", True),
    "eurosat": ("eurosat", "eurosat/rgb:2.*.*", 10, "train[16200:16400]", "train[21600:]", 5_400, "specialized", True),
    "resisc45": ("resisc45", "resisc45:3.*.*", 45, "train[18900:19100]", "train[25200:]", 6_300, "specialized", False),
    "retinopathy": ("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5, "validation[:200]",
                    "test", 42_670, "specialized", True),
    "clevr_count": ("clevr_count", "clevr:3.*.*", 8, "train[63000:63200]", "validation", 15_000, "structured", True),
    "clevr_dist": ("clevr_dist", "clevr:3.*.*", 6, "train[63000:63200]", "validation", 15_000, "structured", True),
    "dmlab": ("dmlab", "dmlab:2.0.1", 6, "validation[:200]", "test", 22_735, "structured", True),
    "kitti": ("kitti", "kitti:3.*.*", 4, "validation[:200]", "test", 711, "structured", True),
    "dsprites_loc": ("dsprites_loc", "dsprites:2.*.*", 16, "train[589824:590024]", "train[663552:]", 73_728, "structured", False),
    "dsprites_ori": ("dsprites_ori", "dsprites:2.*.*", 16, "train[589824:590024]", "train[663552:]", 73_728, "structured", False),
    "smallnorb_azi": ("smallnorb_azi", "smallnorb:2.*.*", 18, "test[:200]", "test[50%:]", 12_150, "structured", False),
    "smallnorb_ele": ("smallnorb_ele", "smallnorb:2.*.*", 9, "test[:200]", "test[50%:]", 12_150, "structured", True),
}

# full tfds split sizes (tfds catalog), to check that the slices give the reference test sizes and follow
# the stated rule (last 10 % of train as val for cifar, caltech, svhn, clevr; 20 % for pets; ...)
TFDS_SIZES = {
    "cifar100:3.*.*": dict(train=50_000, test=10_000),
    "caltech101:3.*.*": dict(train=3_060, test=6_084),
    "dtd:3.*.*": dict(train=1_880, validation=1_880, test=1_880),
    "oxford_flowers102:2.*.*": dict(train=1_020, validation=1_020, test=6_149),
    "oxford_iiit_pet:3.*.*": dict(train=3_680, test=3_669),
    "svhn_cropped:3.*.*": dict(train=73_257, test=26_032),
    "sun397/tfds:4.*.*": dict(train=76_128, validation=10_875, test=21_750),
    "patch_camelyon:2.*.*": dict(train=262_144, validation=32_768, test=32_768),
    "eurosat/rgb:2.*.*": dict(train=27_000),
    "resisc45:3.*.*": dict(train=31_500),
    "diabetic_retinopathy_detection/btgraham-300:3.*.*": dict(train=35_126, validation=10_906, test=42_670),
    "clevr:3.*.*": dict(train=70_000, validation=15_000, test=15_000),
    "dmlab:2.0.1": dict(train=65_550, validation=22_628, test=22_735),
    "kitti:3.*.*": dict(train=6_347, validation=423, test=711),
    "dsprites:2.*.*": dict(train=737_280),
    "smallnorb:2.*.*": dict(train=24_300, test=24_300),
}
HELD_OUT_VAL = {"cifar": 0.9, "caltech101": 0.9, "svhn": 0.9, "clevr_count": 0.9, "clevr_dist": 0.9, "pets": 0.8,
                "eurosat": 0.6, "resisc45": 0.6, "dsprites_loc": 0.8, "dsprites_ori": 0.8}

REFERENCE_FGVC = {  # docs/REFERENCE.md §3 (VPT): name -> (classes, train, val, test, image dir)
    "cub": (200, 5_394, 600, 5_794, "images"), "nabirds": (555, 21_536, 2_393, 24_633, "images"),
    "flowers": (102, 1_020, 1_020, 6_149, ""), "dogs": (120, 10_800, 1_200, 8_580, "Images"),
    "cars": (196, 7_329, 815, 8_041, ""),
}


def test_registry_is_spec_table():
    assert list(vtab.TASKS) == list(REFERENCE_VTAB)
    for name, (folder, builder, c, val200, test, test_size, group, flip) in REFERENCE_VTAB.items():
        t = vtab.TASKS[name]
        assert (t.name, t.folder, t.tfds_name, t.num_classes, t.group, t.flip, t.test_size) == \
               (name, folder, builder, c, group, flip, test_size), name
        assert t.splits == {"train800": "train[:800]", "val200": val200,
                            "train800val200": f"train[:800]+{val200}", "test": test}, name
        assert t.expected_sizes() == {"train800": 800, "val200": 200, "train800val200": 1000, "test": test_size}
    assert sum(t.num_classes for t in vtab.TASKS.values()) == 940  # heads over 19 tasks (docs/REFERENCE.md §1.0)
    assert [sum(t.group == g for t in vtab.TASKS.values()) for g in vtab.GROUPS] == [7, 4, 8]


def _absolute(spec, sizes):
    from peft_vit.data.tfds_source import import_tfds

    tfds = import_tfds()

    infos = {k: SimpleNamespace(num_examples=v) for k, v in sizes.items()}
    return [(a.splitname, a.from_ or 0, sizes[a.splitname] if a.to is None else a.to)  # None: split start/end
            for a in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)]


@pytest.mark.tfds
@pytest.mark.parametrize("name", list(REFERENCE_VTAB))
def test_split_strings_select_reference_counts(name):
    """With the real tfds split sizes, tfds' own slicing of each split string yields 800 / 200 /
    1000 / the reference test size, and val200 starts where the held-out part of train starts."""
    t = vtab.TASKS[name]
    sizes = TFDS_SIZES[t.tfds_name]
    count = lambda s: sum(b - a for _, a, b in _absolute(s, sizes))  # noqa: E731
    assert {k: count(v) for k, v in t.splits.items()} == t.expected_sizes()
    if name in HELD_OUT_VAL:
        assert _absolute(t.val200, sizes)[0][1] == int(HELD_OUT_VAL[name] * sizes["train"])
    if name.startswith("smallnorb"):
        assert _absolute(t.val200, sizes)[0][1] == 0  # val = first half of test
    # train800val200 is train800 then val200, so the folder writes it as their concatenation
    assert _absolute(t.splits["train800val200"], sizes) == _absolute(t.splits["train800"], sizes) + \
           _absolute(t.splits["val200"], sizes)


# ---- label transforms, written from the "label" column of docs/REFERENCE.md §2 (task_adaptation's preprocessing)

def _kitti(types, zs):
    return {"objects": {"type": list(types), "location": [[0.0, 0.0, z] for z in zs]}}


def _clevr(zs):
    return {"objects": {"size": [0] * len(zs), "pixel_coords": [[10.0, 10.0, z] for z in zs]}}


LABEL_CASES = {
    "clevr_count": [(_clevr([9.0] * n), n - 3) for n in range(3, 11)],
    "clevr_dist": [(_clevr([z, 50.0]), y) for z, y in
                   [(0.5, 0), (7.99, 0), (8.0, 0), (8.01, 1), (8.5, 1), (8.7, 2), (9.2, 3), (9.7, 4), (10.0, 4),
                    (10.01, 5), (60.0, 5)]],
    "kitti": [(_kitti([0], [5.0]), 0), (_kitti([1], [8.0]), 0), (_kitti([2], [8.5]), 1), (_kitti([0], [20.0]), 1),
              (_kitti([0], [25.0]), 2), (_kitti([0, 1], [30.0, 12.0]), 1),
              (_kitti([3, 0], [2.0, 25.0]), 2),  # pedestrian (type 3) nearer: ignored
              (_kitti([3, 4, 5, 6, 7], [1.0] * 5), 3), (_kitti([], []), 3)],  # no vehicle -> last class
    "dsprites_loc": [({"label_x_position": x}, x // 2) for x in range(32)],
    "dsprites_ori": [({"label_orientation": o}, math.floor(o / 2.5)) for o in range(40)],
    "smallnorb_azi": [({"label_azimuth": a, "label_elevation": 0}, a) for a in range(18)],
    "smallnorb_ele": [({"label_azimuth": 0, "label_elevation": e}, e) for e in range(9)],
}


@pytest.mark.parametrize("name", list(REFERENCE_VTAB))
def test_label_transform(name):
    t = vtab.TASKS[name]
    cases = LABEL_CASES.get(name, [({"label": y}, y) for y in range(t.num_classes)])
    got = [t.label_fn(ex) for ex, _ in cases]
    assert got == [y for _, y in cases]
    if name not in LABEL_CASES:
        assert t.label == "label"
    assert {y for _, y in cases} <= set(range(t.num_classes))
    if name.startswith("dsprites"):  # 32 positions / 40 orientations -> 16 classes, all used
        assert {y for _, y in cases} == set(range(16))


def test_image_transforms_of_single_channel_sources():
    import numpy as np

    from peft_vit.data.tfds_source import gray_to_rgb

    gray = {n for n, t in vtab.TASKS.items() if t.gray}
    assert gray == {"dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"}
    assert {n: vtab.TASKS[n].pixel_scale for n in gray} == {"dsprites_loc": 255, "dsprites_ori": 255,
                                                            "smallnorb_azi": 1, "smallnorb_ele": 1}
    img = np.array([[[0], [1]], [[1], [0]]], dtype=np.uint8)
    out = gray_to_rgb(img, 255)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 2]).all() and out[0, 1, 1] == 255 and out[0, 0, 0] == 0
    assert (gray_to_rgb(np.full((3, 3, 1), 77, np.uint8))[..., 1] == 77).all()


def test_folder_names_and_aliases_are_unambiguous():
    seen = {}
    for t in vtab.TASKS.values():
        for f in t.folders:
            assert f.lower() not in seen, f"{f} names both {seen.get(f.lower())} and {t.name}"
            seen[f.lower()] = t.name
    for alias in ("cifar100", "oxford_pet", "caltech_102", "oxford_iiit_pet", "flowers102", "svhn_cropped",
                  "patch_camelyon", "diabetic_retinopathy", "eurosat", "clevr_count_all",
                  "clevr_closest_object_distance", "dsprites_location", "dsprites_orientation",
                  "smallnorb_azimuth", "smallnorb_elevation", "kitti_distance"):
        assert alias.lower() in seen, alias
    assert vtab.get_task("CIFAR100").name == "cifar"


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError) as e:
        vtab.get_task("imagenet")
    assert "unknown VTAB-1k task 'imagenet'" in str(e.value)
    for name in REFERENCE_VTAB:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="unknown FGVC dataset 'aircraft'.*cub, nabirds, flowers, dogs, cars"):
        fgvc.get_dataset("aircraft")


def test_fgvc_registry_is_spec_table():
    assert list(fgvc.DATASETS) == list(REFERENCE_FGVC)
    for name, (c, tr, va, te, img) in REFERENCE_FGVC.items():
        d = fgvc.DATASETS[name]
        assert (d.num_classes, d.sizes, d.image_dir) == (c, (tr, va, te), img)


def _configs(family):
    return sorted(p for p in (CONFIGS / "dataset" / family).glob("*.yaml") if not p.name.startswith("_"))


def test_dataset_configs_match_registries():
    vt, fg = _configs("vtab"), _configs("fgvc")
    assert {p.stem for p in vt} == set(vtab.TASKS) and {p.stem for p in fg} == set(fgvc.DATASETS)
    for family, registry, files in (("vtab", vtab.TASKS, vt), ("fgvc", fgvc.DATASETS, fg)):
        for p in files:
            cfg = compose(f"dataset={family}/{p.stem}").dataset
            rec = registry[p.stem]
            assert (cfg.source, cfg.name, cfg.task, cfg.num_classes, cfg.folder) == \
                   (family, family, rec.name, rec.num_classes, rec.folder), p
            for key in ("root", "img_size", "normalize", "flip"):
                assert key in cfg, (p, key)
            assert Path(OmegaConf.load(p).get("task", "")).name == p.stem
    cfg = compose("dataset=vtab/dtd", "model=vit_tiny_test")
    assert cfg.dataset.img_size == cfg.model.img_size == 32 and cfg.model.num_classes == 47
    assert cfg.dataset.root.endswith("vtab-1k") and cfg.dataset.flip is False
