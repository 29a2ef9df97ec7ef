"""The NOAH-layout reader on generated folders: counts, labels, every folder name and alias,
every image mode, the decode-once cache, and the error messages."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose
from peft_vit.data import build_datasets, vtab
from peft_vit.data.folder import BadImageError, read_list

SIZE = 16  # dataset.img_size in these tests
COUNTS = {"train800": 6, "val200": 3, "test": 4}
# (mode, format): every mode the reader must turn into RGB
MODES = [("RGB", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"),
         ("LA", "PNG"), ("1", "PNG"), ("RGB", "PNG"), ("L", "JPEG")]


def write_image(path: Path, mode: str = "RGB", fmt: str = "JPEG", value: int = 128, size=(20, 14)):
    """An image of one grey level ``value`` (0..255) in ``mode``; I;16 stores value * 257."""
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(np.full((h, w), value * 257, dtype=np.uint16))
    elif mode == "1":
        img = Image.new("1", size, int(value >= 128))
    else:
        img = Image.new("RGB", size, (value,) * 3)
        img = img.convert(mode) if mode != "P" else img.quantize(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def make_task(root: Path, folder: str, num_classes: int, counts=COUNTS, modes=(("RGB", "JPEG"),)) -> dict:
    """A NOAH-layout folder; label of item i is i % C, its grey level 10 + 20 * (i % 12).
    Returns {split: [labels]}."""
    d = Path(root) / folder
    labels = {}
    for split, n in counts.items():
        lines, labels[split] = [], []
        for i in range(n):
            mode, fmt = modes[i % len(modes)]
            rel = f"images/{split}/{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
            write_image(d / rel, mode, fmt, value=10 + 20 * (i % 12))
            lines.append(f"{rel} {i % num_classes}\n")
            labels[split].append(i % num_classes)
        (d / f"{split}.txt").write_text("".join(lines))
    (d / "train800val200.txt").write_text((d / "train800.txt").read_text() + (d / "val200.txt").read_text())
    labels["train800val200"] = labels["train800"] + labels["val200"]
    return labels


def data_cfg(task: str, root, *extra, protocol="final"):
    return compose(f"dataset=vtab/{task}", "model=vit_tiny_test", f"dataset.root={root}", f"dataset.img_size={SIZE}",
                   "dataset.prepare_if_missing=false", f"protocol={protocol}", *extra)


def labels_of(ds):  # InMemoryImages (train, val200) and ImageList (test) both keep a label tensor
    return ds.labels.tolist()


@pytest.mark.parametrize("name", list(vtab.TASKS))
def test_every_task_folder_reads(tmp_path, name):
    t = vtab.TASKS[name]
    labels = make_task(tmp_path, t.folder, t.num_classes)
    for protocol, (tr, ev) in {"tune": ("train800", "val200"), "final": ("train800val200", "test")}.items():
        data = build_datasets(data_cfg(name, tmp_path, protocol=protocol))
        assert (data.train_split, data.eval_split, data.num_classes) == (tr, ev, t.num_classes)
        assert labels_of(data.train) == labels[tr] and labels_of(data.eval) == labels[ev]
        x, y = data.eval[1]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and y == labels[ev][1]
        assert data.train.images.shape == (len(labels[tr]), 3, SIZE, SIZE)


ALIASES = ["cifar100", "oxford_pet", "caltech_102", "oxford_iiit_pet", "flowers102", "svhn_cropped", "patch_camelyon",
           "diabetic_retinopathy", "eurosat", "clevr_count_all", "clevr_closest_object_distance", "dsprites_location",
           "dsprites_orientation", "smallnorb_azimuth", "smallnorb_elevation", "kitti_distance", "Caltech101", "SUN397"]


@pytest.mark.parametrize("alias", ALIASES)
def test_folder_aliases(tmp_path, alias):
    t = vtab.get_task(alias)
    labels = make_task(tmp_path, alias, t.num_classes, counts={"train800": 2, "val200": 1, "test": 2})
    data = build_datasets(data_cfg(t.name, tmp_path))
    assert labels_of(data.eval) == labels["test"]
    assert Path(data.eval.listing.source).parent.name == alias


def test_image_modes_and_formats(tmp_path):
    """L, P, RGBA, CMYK, 16-bit, LA, 1-bit, jpg and png all arrive as RGB at the right grey level."""
    t = vtab.TASKS["cifar"]
    n = len(MODES)
    make_task(tmp_path, "cifar", 100, counts={"train800": n, "val200": 2, "test": n}, modes=MODES)
    data = build_datasets(data_cfg("cifar", tmp_path, "dataset.normalize=none"))
    for i, (mode, fmt) in enumerate(MODES):
        want = 10 + 20 * (i % 12)
        if mode == "1":
            want = 255 * (want >= 128)
        x, _ = data.eval[i]
        assert x.shape == (3, SIZE, SIZE), mode
        got = x * 255  # normalize=none: x = uint8 / 255
        assert (got - want).abs().max() <= 3, (mode, fmt, want, got.mean())
        assert torch.allclose(data.train.images[i].float(), got, atol=0.5), mode  # in memory == streamed
    assert t.num_classes == 100


def test_flip_choices(tmp_path):
    make_task(tmp_path, "dtd", 47)
    make_task(tmp_path, "cifar", 100)
    flip = lambda task, v: build_datasets(data_cfg(task, tmp_path, f"dataset.flip={v}")).train.flip  # noqa: E731
    assert flip("dtd", "rlrr") is True and flip("cifar", "rlrr") is False  # RLRR's per-task choice
    assert flip("cifar", "true") is True and flip("dtd", "false") is False
    with pytest.raises(ValueError, match="dataset.flip='sometimes'"):
        flip("dtd", "sometimes")


def test_decode_once_cache(tmp_path, monkeypatch):
    import peft_vit.data.folder as folder

    make_task(tmp_path / "data", "svhn", 10)
    cache = tmp_path / "cache"
    first = build_datasets(data_cfg("svhn", tmp_path / "data", f"dataset.cache_dir={cache}"))
    files = sorted(cache.glob("*.npy"))
    assert [f.name.split("-")[:3] for f in files] == [["svhn", "test", f"{SIZE}px"],
                                                      ["svhn", "train800val200", f"{SIZE}px"]]

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(folder, "decode_all", boom)
    second = build_datasets(data_cfg("svhn", tmp_path / "data", f"dataset.cache_dir={cache}"))
    assert torch.equal(first.train.images, second.train.images)
    with pytest.raises(AssertionError, match="decoded again"):  # another size is another cache entry
        build_datasets(data_cfg("svhn", tmp_path / "data", f"dataset.cache_dir={cache}", "dataset.img_size=8"))


def test_eval_set_is_lazy_and_picklable(tmp_path):
    """Without a cache the test set streams from disk, through DataLoader workers."""
    make_task(tmp_path, "kitti", 4)
    data = build_datasets(data_cfg("kitti", tmp_path, "dataset.cache_dir=null"))
    clone = pickle.loads(pickle.dumps(data.eval))
    assert torch.equal(clone[2][0], data.eval[2][0])
    loader = torch.utils.data.DataLoader(data.eval, batch_size=3, num_workers=1)
    xs = torch.cat([x for x, _ in loader])
    assert xs.shape == (COUNTS["test"], 3, SIZE, SIZE)


# ---- bad inputs: each gets a message naming what to fix

def test_missing_root_names_path_and_both_ways(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(data_cfg("pets", root))
    msg = str(e.value)
    assert str(root) in msg and "oxford_iiit_pet" in msg and "oxford_pet" in msg
    assert "vtab-1k.zip" in msg and "python scripts/prepare_vtab.py pets" in msg
    assert "prepare_if_missing" in msg


def test_manual_tasks_say_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(data_cfg("resisc45", tmp_path))
    assert "NWPU-RESISC45.rar" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(data_cfg("retinopathy", tmp_path))
    assert "diabetic-retinopathy-detection" in str(e.value) and "trainLabels.csv" in str(e.value)


def test_incomplete_folder_is_named(tmp_path):
    (tmp_path / "cifar").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cifar exists but has no train800val200.txt"):
        build_datasets(data_cfg("cifar", tmp_path))


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match=r"unknown VTAB-1k task 'imagenet'; known tasks: cifar \(natural\)"):
        build_datasets(data_cfg("cifar", tmp_path, "dataset.task=imagenet"))


def test_label_out_of_range_names_line(tmp_path):
    make_task(tmp_path, "dtd", 47)
    lst = tmp_path / "dtd" / "train800val200.txt"
    lines = lst.read_text().splitlines()
    lines[2] = lines[2].rsplit(maxsplit=1)[0] + " 47"
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{lst}:3: label 47 outside \[0, 47\)"):
        build_datasets(data_cfg("dtd", tmp_path))
    lst.write_text("images/train800/000000.jpg -1\nimages/train800/000001.jpg x\n")
    with pytest.raises(ValueError, match=rf"{lst}:1: label -1 outside"):
        build_datasets(data_cfg("dtd", tmp_path))
    lst.write_text("images/train800/000001.jpg x\n")
    with pytest.raises(ValueError, match=rf"{lst}:1: label 'x' is not an integer"):
        read_list(lst, 47)
    lst.write_text("just_a_path.jpg\n")
    with pytest.raises(ValueError, match=rf"{lst}:1: expected '<image path> <label>'"):
        read_list(lst, 47)


def test_missing_image_names_file_and_line(tmp_path):
    make_task(tmp_path, "eurosat", 10)
    gone = tmp_path / "eurosat" / "images" / "test" / "000002.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(data_cfg("eurosat", tmp_path))
    assert f"{gone} (listed at {tmp_path / 'eurosat' / 'test.txt'}:3)" in str(e.value)


def test_corrupt_image_names_file_and_line(tmp_path):
    make_task(tmp_path, "eurosat", 10)
    bad = tmp_path / "eurosat" / "images" / "train800" / "000001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(BadImageError) as e:  # the training set is decoded at build time
        build_datasets(data_cfg("eurosat", tmp_path))
    assert f"cannot decode image {bad} (listed at {tmp_path / 'eurosat' / 'train800val200.txt'}:2)" in str(e.value)
    # a truncated test image fails when decoded into the cache, or, without one, when streamed,
    # naming its line either way
    good = tmp_path / "eurosat" / "images" / "train800" / "000000.jpg"
    bad.write_bytes(good.read_bytes())
    test_img = tmp_path / "eurosat" / "images" / "test" / "000003.jpg"
    test_img.write_bytes(test_img.read_bytes()[:40])
    with pytest.raises(BadImageError, match=rf"{test_img} \(listed at .*test.txt:4\)"):
        build_datasets(data_cfg("eurosat", tmp_path))
    data = build_datasets(data_cfg("eurosat", tmp_path, "dataset.cache_dir=null"))
    with pytest.raises(BadImageError, match=rf"{test_img} \(listed at .*test.txt:4\)"):
        data.eval[3]


def test_num_classes_mismatch(tmp_path):
    make_task(tmp_path, "dtd", 47)
    with pytest.raises(ValueError, match="dataset.num_classes=10 but VTAB-1k dtd has 47"):
        build_datasets(data_cfg("dtd", tmp_path, "dataset.num_classes=10"))


def test_to_rgb_scales_16_bit_and_keeps_8_bit_values():
    from peft_vit.data.transforms import to_rgb

    full = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))  # real 16-bit range
    assert np.asarray(to_rgb(full))[0, :, 0].tolist() == [0, 100, 255]
    low = Image.new("RGB", (2, 1), (60, 60, 60)).convert("I")  # 8-bit values in a 32-bit container
    assert np.asarray(to_rgb(low))[0, :, 1].tolist() == [60, 60]
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"
