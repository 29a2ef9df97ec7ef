"""The tfds path, on tfds' own mocking (``tfds.testing.mock_data`` with an ``as_dataset`` that
honours the split string): for every task, prepare_vtab writes train800 / val200 /
train800val200 / test with the sizes the split strings select, and each line's label is task_adaptation's
label transform of the example tfds served at that position."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import compose
from peft_vit.data import build_datasets, vtab

from peft_vit.data.tfds_source import import_tfds  # noqa: E402

tfds = import_tfds()  # tensorflow-datasets is in requirements.txt: these tests run, never skip
import tensorflow as tf  # noqa: E402

pytestmark = pytest.mark.tfds

# Split sizes served by the mock: the real ones (so every VTAB slice is valid), except that the
# split the test set is cut from is made short, so the test sets stay a handful of images.
FAKE_SIZES = {
    "cifar100": dict(train=50_000, test=5), "caltech101": dict(train=3_060, test=5),
    "dtd": dict(train=1_880, validation=1_880, test=5),
    "oxford_flowers102": dict(train=1_020, validation=1_020, test=5),
    "oxford_iiit_pet": dict(train=3_680, test=5), "svhn_cropped": dict(train=73_257, test=5),
    "sun397": dict(train=76_128, validation=10_875, test=5),
    "patch_camelyon": dict(train=262_144, validation=32_768, test=5), "eurosat": dict(train=21_605),
    "resisc45": dict(train=25_205), "diabetic_retinopathy_detection": dict(train=35_126, validation=10_906, test=5),
    "clevr": dict(train=70_000, validation=5, test=15_000), "dmlab": dict(train=65_550, validation=22_628, test=5),
    "kitti": dict(train=6_347, validation=423, test=5), "dsprites": dict(train=663_557),
    "smallnorb": dict(train=24_300, test=202),
}
OFFSET = {"train": 0, "validation": 7, "test": 13}  # example i of split s is generated from n = i + OFFSET[s]
CLEVR_Z = [4.0, 8.25, 8.75, 9.25, 9.75, 50.0]  # nearest-object depth for clevr_dist class n % 6
KITTI = [([3, 0], [1.0, 4.0]), ([3, 1], [1.0, 14.0]), ([3, 2], [1.0, 500.0]), ([3, 5], [1.0, 2.0])]  # class n % 4


def reference_label(task: str, n: int, num_classes: int) -> int:
    """The label column of docs/REFERENCE.md §2, for the fake example n below."""
    return {"clevr_count": n % 8, "clevr_dist": n % 6, "kitti": n % 4, "dsprites_loc": (n % 32) // 2,
            "dsprites_ori": math.floor((n % 40) / 2.5), "smallnorb_azi": n % 18,
            "smallnorb_ele": n % 9}.get(task, n % num_classes)


def pixel_value(builder: str, n: int) -> int:
    return 255 * (n % 2) if builder == "dsprites" else n % 251


def _resize_seq(seq: dict, length: int) -> dict:
    def fit(v):
        v = np.asarray(v)
        return [b"x"] * length if v.dtype.kind in "USO" else np.resize(v, (length,) + v.shape[1:])
    return {k: fit(v) for k, v in seq.items()}


def fake_example(builder, template: dict, n: int) -> dict:
    """A complete example of ``builder``'s features; its label fields and image encode n."""
    feats = builder.info.features
    ex = dict(template)
    shape = tuple(6 if s is None else s for s in feats["image"].shape)
    ex["image"] = np.full(shape, n % 2 if builder.name == "dsprites" else n % 251, np.uint8)
    for k, f in feats.items():
        if isinstance(f, tfds.features.ClassLabel):
            ex[k] = n % f.num_classes
        elif isinstance(f, tfds.features.Text):
            ex[k] = b"x"
        elif isinstance(f, tfds.features.Sequence):
            ex[k] = _resize_seq(template[k], 1)
    if builder.name == "clevr":
        objs = _resize_seq(template["objects"], 3 + n % 8)
        z = np.full(len(objs["size"]), 60.0, np.float32)
        z[-1] = CLEVR_Z[n % 6]
        objs["pixel_coords"] = np.stack([np.ones_like(z), np.ones_like(z), z], 1)
        ex["objects"] = objs
    if builder.name == "kitti":
        types, zs = KITTI[n % 4]
        objs = _resize_seq(template["objects"], len(types))
        objs["type"] = np.array(types)
        objs["location"] = np.array([[0.0, 1.0, z] for z in zs], np.float32)
        objs["bbox"] = np.tile(np.array([0.1, 0.1, 0.5, 0.5], np.float32), (len(types), 1))
        ex["objects"] = objs
    return ex


def absolute(spec: str, sizes: dict):
    """(split, index) pairs that tfds' slicing of ``spec`` selects."""
    infos = {k: SimpleNamespace(num_examples=v) for k, v in sizes.items()}
    out = []
    for a in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos):
        stop = sizes[a.splitname] if a.to is None else a.to
        out += [(a.splitname, i) for i in range((a.from_ or 0), stop)]
    return out


def _plain(value, spec):
    """An encoded feature value as tf.data takes it: numeric arrays, bytes for strings."""
    if spec.np_dtype == object:
        to_bytes = np.vectorize(lambda x: x if isinstance(x, bytes) else str(x).encode(), otypes=[object])
        return to_bytes(np.asarray(value, dtype=object))
    return np.asarray(value, dtype=spec.np_dtype)


def _columns(examples: list, spec):
    """Encoded examples -> one column per feature (ragged along the first axis for sequences)."""
    if isinstance(spec, dict):
        return {k: _columns([e[k] for e in examples], sp) for k, sp in spec.items()}
    values = [_plain(v, spec) for v in examples]
    if spec.shape and spec.shape[0] is None:
        return tf.RaggedTensor.from_row_lengths(np.concatenate(values), [len(v) for v in values])
    return np.stack(values)


def fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    """Stands in for ``FileReaderBuilder._as_dataset``: serves exactly the examples the split
    string selects, encoded and then decoded by the builder's own features (so SkipDecoding
    hands back the stored bytes, as with real data)."""
    from tensorflow_datasets.testing.mocking import RandomFakeGenerator

    feats = self.info.features
    template = RandomFakeGenerator(feats, 1)[0]
    images = {}  # encoding is the slow part and images repeat: encode each distinct one once

    def encode(ex):
        key = int(ex["image"].flat[0])
        if key not in images:
            images[key] = feats["image"].encode_example(ex["image"])
        return {k: images[key] if k == "image" else f.encode_example(ex[k]) for k, f in feats.items()}

    examples = [encode(fake_example(self, template, i + OFFSET[s]))
                for s, i in absolute(str(split), FAKE_SIZES[self.name])]
    ds = tf.data.Dataset.from_tensor_slices(_columns(examples, feats.get_serialized_info()))
    return ds.map(lambda ex: feats.decode_example(ex, decoders=decoders))


@pytest.fixture
def mocked_tfds(monkeypatch):
    """tfds' mock: ``download_and_prepare`` downloads nothing, so nothing is pending either (the
    check that the download hosts can be reached has nothing to check; test_newcomer.py runs it
    offline for real)."""
    from peft_vit.data import tfds_source

    monkeypatch.setattr(tfds_source, "pending_downloads", lambda builder, download_dir=None: [])
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=fake_as_dataset):
        yield


@pytest.mark.parametrize("name", list(vtab.TASKS))
def test_prepare_task_from_tfds(tmp_path, mocked_tfds, name):
    from peft_vit.data.tfds_source import prepare_task

    task = vtab.TASKS[name]
    folder = prepare_task(task, tmp_path)
    assert folder == tmp_path / task.folder
    builder = task.tfds_name.split("/")[0].split(":")[0]
    sizes = FAKE_SIZES[builder]
    source = json.loads((folder / "tfds_source.json").read_text())
    assert source["splits"] == task.splits
    if name == "pets":  # tfds 4.9 only has oxford_iiit_pet 4.0.0: the fallback, recorded
        assert source["tfds_builder"].startswith("oxford_iiit_pet/") and source["requested"] == "oxford_iiit_pet:3.*.*"
    for split, spec in task.splits.items():
        lines = (folder / f"{split}.txt").read_text().splitlines()
        want = absolute(spec, sizes)
        assert len(lines) == len(want) == source["counts"][split]
        if split != "test":
            assert len(lines) == {"train800": 800, "val200": 200, "train800val200": 1000}[split]
        labels = [int(line.rsplit(maxsplit=1)[1]) for line in lines]
        assert labels == [reference_label(name, i + OFFSET[s], task.num_classes) for s, i in want], split
        assert set(labels) <= set(range(task.num_classes))
        for j in (0, len(lines) - 1):  # the image on a line is the example at that position
            rel = lines[j].rsplit(maxsplit=1)[0]
            img = Image.open(folder / rel)
            arr = np.asarray(img.convert("RGB"))
            if task.gray:
                assert img.mode == "RGB" and rel.endswith(".png")
            s, i = want[j]
            assert abs(int(arr.mean()) - pixel_value(builder, i + OFFSET[s])) <= 2, (split, j)
    assert (folder / "train800val200.txt").read_text() == \
           (folder / "train800.txt").read_text() + (folder / "val200.txt").read_text()
    if builder == "cifar100":  # tfds stores CIFAR as PNG: written as is, lossless
        assert lines[0].split()[0].endswith(".png")
    # the folder reader serves what was prepared
    cfg = compose(f"dataset=vtab/{name}", "model=vit_tiny_test", f"dataset.root={tmp_path}", "dataset.img_size=8",
                  "dataset.prepare_if_missing=false", "protocol=tune")
    data = build_datasets(cfg)
    assert (len(data.train), len(data.eval)) == (800, 200)


def test_prepare_if_missing_on_first_use(tmp_path, mocked_tfds):
    cfg = compose("dataset=vtab/kitti", "model=vit_tiny_test", f"dataset.root={tmp_path}", "dataset.img_size=8",
                  "dataset.prepare_if_missing=true", "protocol=final")
    data = build_datasets(cfg)
    assert (tmp_path / "kitti" / "tfds_source.json").is_file()
    assert (len(data.train), len(data.eval)) == (1000, FAKE_SIZES["kitti"]["test"])
    assert not list(tmp_path.glob(".kitti.partial*"))  # written aside, then renamed into place


def test_prepare_vtab_script(tmp_path, mocked_tfds, capsys):
    from test_data_scripts import script as load

    script = load("prepare_vtab")
    assert script.main(["--list"]) == 0
    assert "floor(label_orientation * 2 / 5)" in capsys.readouterr().out
    assert script.main(["oxford_pet", "--root", str(tmp_path)]) == 0  # folder names work too
    assert (tmp_path / "oxford_iiit_pet" / "test.txt").is_file()
    assert "pets" in capsys.readouterr().out
    assert script.main(["imagenet", "--root", str(tmp_path)]) == 2
    assert "unknown VTAB-1k task 'imagenet'" in capsys.readouterr().err


@pytest.mark.parametrize("name,needs", [("resisc45", "NWPU-RESISC45.rar"), ("retinopathy", "trainLabels.csv")])
def test_manual_download_instructions(tmp_path, mocked_tfds, monkeypatch, name, needs):
    from peft_vit.data.tfds_source import prepare_task

    def no_manual_files(self, *a, **k):
        raise AssertionError("Manual directory does not exist or is empty")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_manual_files)
    with pytest.raises(RuntimeError) as e:
        prepare_task(vtab.TASKS[name], tmp_path / "vtab", data_dir=str(tmp_path / "tfds"))
    msg = str(e.value)
    assert needs in msg and "downloads/manual" in msg and f"prepare_vtab.py {name}" in msg
    assert "Manual directory does not exist" in msg and not (tmp_path / "vtab" / vtab.TASKS[name].folder).exists()


def test_unreachable_names_the_hosts_a_connection_cannot_reach(monkeypatch):
    import socket

    from peft_vit.data.tfds_source import unreachable

    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        up, down = listening.getsockname()[1], closed.getsockname()[1]
        assert unreachable([f"http://127.0.0.1:{up}/a.tar.gz", f"http://127.0.0.1:{up}/b.tar.gz"]) == {}
        why = unreachable([f"http://127.0.0.1:{up}/a", f"http://127.0.0.1:{down}/b"], timeout=2)
    assert list(why) == ["127.0.0.1"] and "ConnectionRefusedError" in why["127.0.0.1"]
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{down}")  # through the proxy the environment names
    assert "via proxy" in unreachable(["https://www.cs.toronto.edu/x.tar.gz"], timeout=2)["www.cs.toronto.edu"]


def test_pending_downloads_leaves_out_what_is_downloaded(tmp_path):
    from tensorflow_datasets.core.download.resource import get_dl_fname

    from peft_vit.data.tfds_source import builder_for, pending_downloads

    b = builder_for(vtab.TASKS["flowers"], str(tmp_path))
    urls = sorted(b.url_infos)
    assert sorted(pending_downloads(b)) == urls and len(urls) == 3
    first = tmp_path / "downloads" / b.name / get_dl_fname(urls[0], b.url_infos[urls[0]].checksum)
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    assert sorted(pending_downloads(b)) == urls[1:]


def test_the_task_lock_is_removed_and_a_waiter_takes_the_next_one(tmp_path):
    import threading

    from peft_vit.data.tfds_source import _lock

    path = tmp_path / "vtab" / ".cifar.lock"
    order = []
    with _lock(path):
        assert path.is_file()
        waiter = threading.Thread(target=lambda: _hold(path, order))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # blocked on the lock
        order.append("first")
    waiter.join(10)
    assert order == ["first", "waiter"]
    assert not path.exists()
    with _lock(tmp_path / "new" / "root" / ".cifar.lock"):
        pass
    assert not (tmp_path / "new").exists()  # alone, a run leaves neither the lock nor the folders it made


def _hold(path, order):
    from peft_vit.data.tfds_source import _lock

    with _lock(path):
        assert path.is_file()
        order.append("waiter")
