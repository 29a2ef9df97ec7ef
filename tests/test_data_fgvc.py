"""FGVC through VPT's json split files, on generated data."""
import json
from pathlib import Path

import pytest
import torch

from conftest import compose
from peft_vit.data import build_datasets, fgvc
from test_data_folder import write_image

SIZE = 16


def make_fgvc(root: Path, name: str, per_split=(6, 3, 4), ids=None, image_dir=None, modes=("RGB",)) -> dict:
    """A VPT-style tree for ``name``: {train,val,test}.json mapping relative paths to the
    dataset's own (non-contiguous) class ids. Returns {split: [(relpath, id)]}."""
    ds = fgvc.DATASETS[name]
    d = root / ds.folder
    img_root = d / (ds.image_dir if image_dir is None else image_dir)
    ids = ids or [10 * (c + 1) for c in range(ds.num_classes)]  # 10, 20, ... : not contiguous, not 0-based
    out = {}
    for split, n in zip(fgvc.SPLITS, per_split):
        anno = {}
        for i in range(n):
            cls = ids[(i * 7 + len(split)) % len(ids)]
            rel = f"{cls:03d}.class/{split}_{i:04d}.jpg"
            write_image(img_root / rel, modes[i % len(modes)], "JPEG" if modes[i % len(modes)] in ("RGB", "L", "CMYK")
                        else "PNG", value=(37 * i) % 256, size=(24, 18))
            anno[rel] = cls
        (d / f"{split}.json").write_text(json.dumps(anno))
        out[split] = list(anno.items())
    # as in the real splits, train holds every class
    seen = {c for _, c in out["train"]}
    extra = {f"{c:03d}.class/extra.jpg": c for c in ids if c not in seen}
    for rel in extra:
        write_image(img_root / rel, size=(24, 18))
    if extra:
        anno = dict(out["train"]) | extra
        (d / "train.json").write_text(json.dumps(anno))
        out["train"] = list(anno.items())
    return out


def cfg_for(name, root, *extra, protocol="final"):
    return compose(f"dataset=fgvc/{name}", "model=vit_tiny_test", f"dataset.root={root}", f"dataset.img_size={SIZE}",
                   f"protocol={protocol}", *extra)


@pytest.mark.parametrize("name", list(fgvc.DATASETS))
def test_fgvc_reads_vpt_json(tmp_path, name):
    ds = fgvc.DATASETS[name]
    anno = make_fgvc(tmp_path, name)
    ids = sorted({c for v in anno.values() for _, c in v})
    cont = {c: i for i, c in enumerate(ids)}
    assert len(ids) == ds.num_classes
    for protocol, (tr, ev) in {"tune": (["train"], ["val"]), "final": (["train", "val"], ["test"])}.items():
        data = build_datasets(cfg_for(name, tmp_path, protocol=protocol))
        want = lambda splits: [cont[c] for s in splits for _, c in anno[s]]  # noqa: E731
        assert data.train.labels.tolist() == want(tr) and data.eval.labels.tolist() == want(ev)
        assert data.num_classes == ds.num_classes
        names = {"tune": ("train", "val"), "final": ("train+val", "test")}[protocol]
        assert (data.train_split, data.eval_split) == names
        x, y = data.eval[0]
        assert x.shape == (3, SIZE, SIZE) and y == want(ev)[0]
        x, _ = data.train[len(data.train) - 1]  # the last item comes from val.json in "final"
        assert x.shape == (3, SIZE, SIZE)


def test_fgvc_transforms_and_modes(tmp_path):
    make_fgvc(tmp_path, "cub", per_split=(6, 3, 6), modes=("RGB", "L", "P", "RGBA", "CMYK", "I;16"))
    data = build_datasets(cfg_for("cub", tmp_path, "dataset.train_crop=resize_crop"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = data.train[3][0]
        torch.manual_seed(0)
        b = data.train[3][0]
    assert torch.equal(a, b)  # random crops draw from torch's global RNG: seeded per item by the loop
    assert torch.equal(data.eval[2][0], data.eval[2][0])  # eval: resize + centre crop, deterministic
    for i in range(6):
        assert data.eval[i][0].shape == (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="dataset.train_crop='zoom'"):
        build_datasets(cfg_for("cub", tmp_path, "dataset.train_crop=zoom"))


def test_fgvc_paths_may_include_the_image_dir(tmp_path):
    # some copies of the json files list "images/…" paths: both resolve
    anno = make_fgvc(tmp_path, "nabirds", image_dir="images")
    d = tmp_path / "nabirds"
    for split in fgvc.SPLITS:
        a = json.loads((d / f"{split}.json").read_text())
        (d / f"{split}.json").write_text(json.dumps({f"images/{k}": v for k, v in a.items()}))
    data = build_datasets(cfg_for("nabirds", tmp_path))
    assert len(data.eval) == len(anno["test"])


def test_fgvc_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_datasets(cfg_for("dogs", tmp_path / "none"))
    msg = str(e.value)
    assert "Stanford-dogs" in msg and "train.json" in msg and "vpt" in msg and "prepare_fgvc.py --check" in msg
    make_fgvc(tmp_path, "flowers")
    (tmp_path / "OxfordFlower" / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match="test.json"):
        build_datasets(cfg_for("flowers", tmp_path))
    assert len(build_datasets(cfg_for("flowers", tmp_path, protocol="tune")).eval) == 3  # tune needs no test.json
    (tmp_path / "OxfordFlower" / "val.json").write_text(json.dumps({"010.class/val_0000.jpg": 99999}))
    with pytest.raises(ValueError, match=r"hold 103 distinct class ids, expected 102"):
        build_datasets(cfg_for("flowers", tmp_path, protocol="tune"))
    (tmp_path / "OxfordFlower" / "val.json").write_text("{not json")
    with pytest.raises(ValueError, match="val.json is not valid json"):
        build_datasets(cfg_for("flowers", tmp_path, protocol="tune"))


def test_fgvc_missing_image_names_json_entry(tmp_path):
    anno = make_fgvc(tmp_path, "cars")
    rel = anno["test"][1][0]
    (tmp_path / "Stanford-cars" / rel).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{rel} \(listed at .*test.json entry '{rel}'\)"):
        build_datasets(cfg_for("cars", tmp_path))


def test_prepare_fgvc_check(tmp_path, capsys):
    from test_data_scripts import script

    make_fgvc(tmp_path, "cub")
    assert script("prepare_fgvc").main(["--check", "--root", str(tmp_path), "cub", "dogs"]) == 1
    out = capsys.readouterr().out
    assert "cub (CUB-200-2011, 200 classes): INCOMPLETE" in out  # generated counts are not VPT's
    assert "train.json: " in out and "expected 5,394" in out
    assert "missing: " in out and "Stanford-dogs" in out and "Images/" in out


def test_fgvc_resize_short_side_or_square(tmp_path):
    """VPT's code resizes the short side (aspect kept); RLRR's resizes to a 256×256 square."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from peft_vit.data.transforms import fgvc_eval_transform, fgvc_train_transform

    img = Image.fromarray((torch.arange(18 * 48 * 3) % 251).to(torch.uint8).reshape(18, 48, 3).numpy())  # 48×18
    short, square = fgvc_eval_transform(224, resize="short_side"), fgvc_eval_transform(224, resize="square")
    assert short.transforms[0].size == 256 and square.transforms[0].size == (256, 256)
    assert short(img).size == square(img).size == (224, 224)
    assert TF.to_tensor(square(img)).equal(TF.to_tensor(TF.center_crop(TF.resize(img, [256, 256]), 224)))
    assert not TF.to_tensor(short(img)).equal(TF.to_tensor(square(img)))
    assert fgvc_train_transform(224, "resize_crop", resize="square").transforms[0].size == (256, 256)
    with pytest.raises(ValueError, match="dataset.resize='crop'.*short_side, square"):
        fgvc_eval_transform(224, resize="crop")

    make_fgvc(tmp_path, "cars", per_split=(4, 2, 3))
    a = build_datasets(cfg_for("cars", tmp_path, "dataset.cache_dir=null"))  # streamed: keeps its transform
    b = build_datasets(cfg_for("cars", tmp_path, "dataset.resize=square", "dataset.cache_dir=null"))
    assert a.eval[0][0].shape == b.eval[0][0].shape == (3, SIZE, SIZE)
    n = int(SIZE * 256 / 224)
    assert a.eval.transform.transforms[0].size == n and b.eval.transform.transforms[0].size == (n, n)
    b = build_datasets(cfg_for("cars", tmp_path, "dataset.resize=square", "dataset.train_crop=resize_crop"))
    assert b.train.transform.transforms[0].size == (n, n)
