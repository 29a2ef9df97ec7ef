"""The decode cache (peft_vit.data.folder.decode_cached): reused while the list, the files and
the transform are unchanged, rebuilt when any of them changes, never left half-written, decoded
by a pool of processes, and memory-mapped for test sets."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import peft_vit.data.folder as folder
from peft_vit.data import build_datasets
from peft_vit.data.folder import BadImageError, decode_cached, read_list
from peft_vit.data.transforms import ResizeSquare
from test_data_folder import data_cfg, make_task, write_image

COUNTS = {"train800": 6, "val200": 3, "test": 5}


@pytest.fixture
def task(tmp_path):
    make_task(tmp_path / "data", "dtd", 47, counts=COUNTS)
    return tmp_path / "data" / "dtd"


def no_decoding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(folder, "decode_all", boom)


def test_reuse_then_rebuild_on_changed_image_list_or_transform(tmp_path, task, monkeypatch):
    cache = tmp_path / "cache"
    listing = read_list(task / "test.txt", 47)
    first = decode_cached(listing, ResizeSquare(8), cache, "t")
    assert first.shape == (5, 3, 8, 8) and len(list(cache.glob("t-*.npy"))) == 1

    with monkeypatch.context() as m:  # same list, files and transform: read back, not decoded
        no_decoding(m)
        again = decode_cached(read_list(task / "test.txt", 47), ResizeSquare(8), cache, "t", mmap=True)
        assert torch.equal(again, first)
        path = next(cache.glob("t-*.npy"))
        assert str(path) in Path("/proc/self/maps").read_text()  # memory-mapped, not read into RAM
        # a changed transform, list order or label is another entry: it decodes
        for changed in [lambda: decode_cached(listing, ResizeSquare(8, "bilinear"), cache, "t"),
                        lambda: decode_cached(listing, ResizeSquare(6), cache, "t"),
                        lambda: decode_cached(read_list(task / "train800.txt", 47), ResizeSquare(8), cache, "t")]:
            with pytest.raises(AssertionError, match="decoded again"):
                changed()
        swapped = read_list(task / "test.txt", 47)
        swapped.labels[0] = 46
        with pytest.raises(AssertionError, match="decoded again"):
            decode_cached(swapped, ResizeSquare(8), cache, "t")

    # a changed image (new content, new mtime) rebuilds, and the new pixels are used
    img = task / "images" / "test" / "000002.jpg"
    st = os.stat(img)
    write_image(img, value=250)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = decode_cached(read_list(task / "test.txt", 47), ResizeSquare(8), cache, "t")
    assert not torch.equal(rebuilt[2], first[2]) and torch.equal(rebuilt[[0, 1, 3, 4]], first[[0, 1, 3, 4]])
    assert abs(rebuilt[2].float().mean().item() - 250) < 3
    assert len(list(cache.glob("t-*.npy"))) == 2


def test_killed_or_failed_build_leaves_no_cache_and_is_cleaned_up(tmp_path, task):
    cache = tmp_path / "cache"
    listing = read_list(task / "test.txt", 47)
    bad = task / "images" / "test" / "000003.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:40])
    with pytest.raises(BadImageError, match=r"000003.jpg \(listed at .*test.txt:4\)"):
        decode_cached(listing, ResizeSquare(8), cache, "t")
    # neither a cache nor a temporary file (the empty lock file stays: removing one is a race)
    assert [p.name for p in cache.iterdir()] == [folder.cache_path(listing, ResizeSquare(8), cache, "t").name + ".lock"]
    # a file that is not a complete cache (a foreign or damaged one under the right name) is rebuilt
    bad.write_bytes(good)
    path = folder.cache_path(listing, ResizeSquare(8), cache, "t")
    path.write_bytes(b"\x93NUMPY garbage")
    # the temporary file of a killed writer on this host goes; a live writer's stays
    host = socket.gethostname()
    dead = path.with_name(f"{path.name}.tmp-{host}-{dead_pid()}")
    live = path.with_name(f"{path.name}.tmp-{host}-{os.getppid()}")  # this process's parent: running
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    images = decode_cached(listing, ResizeSquare(8), cache, "t")
    assert images.shape == (5, 3, 8, 8) and np.load(path).shape == (5, 3, 8, 8)
    assert not dead.exists() and live.exists()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_process_pool_equals_one_process(tmp_path):
    n = 80  # above the size that starts a pool
    make_task(tmp_path, "svhn", 10, counts={"train800": 1, "val200": 1, "test": n})
    listing = read_list(tmp_path / "svhn" / "test.txt", 10)
    one = folder.decode_all(listing, ResizeSquare(8), workers=1)
    pool = decode_cached(listing, ResizeSquare(8), tmp_path / "cache", "t", workers=2)
    assert pool.shape == (n, 3, 8, 8) and torch.equal(pool, torch.from_numpy(one))
    write_image(tmp_path / "svhn" / "images" / "test" / "000070.jpg", size=(30, 14))  # another shape: named
    with pytest.raises(ValueError, match=r"000070.jpg \(listed at .*test.txt:71\) is \(3, 14, 30\)"):
        folder.decode_all(listing, lambda im: im, workers=2)


def test_eval_from_cache_equals_streamed(tmp_path, task, monkeypatch):
    """VTAB test sets and FGVC eval sets: the cached set gives the streamed set's items."""
    from test_data_fgvc import cfg_for, make_fgvc

    cache = tmp_path / "cache"
    root = tmp_path / "data"
    cached = build_datasets(data_cfg("dtd", root, f"dataset.cache_dir={cache}"))
    streamed = build_datasets(data_cfg("dtd", root, "dataset.cache_dir=null"))
    assert type(streamed.eval).__name__ == "ImageList" and type(cached.eval).__name__ == "InMemoryImages"
    for i in range(COUNTS["test"]):
        assert torch.equal(cached.eval[i][0], streamed.eval[i][0]) and cached.eval[i][1] == streamed.eval[i][1]
    make_fgvc(tmp_path / "fgvc", "cars", per_split=(4, 2, 3))
    a = build_datasets(cfg_for("cars", tmp_path / "fgvc", f"dataset.cache_dir={cache}"))
    b = build_datasets(cfg_for("cars", tmp_path / "fgvc", "dataset.cache_dir=null"))
    assert type(a.eval).__name__ == "InMemoryImages" and type(a.train).__name__ == "ImageList"
    assert all(torch.equal(a.eval[i][0], b.eval[i][0]) for i in range(3))
    no_decoding(monkeypatch)  # a second run reads both caches back
    build_datasets(data_cfg("dtd", root, f"dataset.cache_dir={cache}"))
    build_datasets(cfg_for("cars", tmp_path / "fgvc", f"dataset.cache_dir={cache}"))


def test_cache_dir_default_and_override(tmp_path):
    from conftest import compose

    os.environ["PEFT_VIT_CACHE"], old = str(tmp_path / "c"), os.environ["PEFT_VIT_CACHE"]
    try:
        assert compose("dataset=vtab/dtd").dataset.cache_dir == str(tmp_path / "c")
        assert compose("dataset=fgvc/cub", "paths.cache_dir=/x").dataset.cache_dir == "/x"
        del os.environ["PEFT_VIT_CACHE"]
        assert compose("dataset=vtab/dtd").dataset.cache_dir == "~/.cache/peft_vit"
    finally:
        os.environ["PEFT_VIT_CACHE"] = old


def test_concurrent_processes_decode_a_missing_entry_once(tmp_path, task, monkeypatch):
    """The ranks of a DDP run (or sweep jobs on one node) that start together: one decodes, the
    others wait on the entry's lock and read its file."""
    import multiprocessing as mp

    calls = tmp_path / "calls"
    calls.mkdir()
    real = folder.decode_all

    def counted(*a, **k):
        (calls / str(os.getpid())).touch()
        time.sleep(1)  # long enough that the other processes ask while this one decodes
        return real(*a, **k)

    monkeypatch.setattr(folder, "decode_all", counted)
    ctx = mp.get_context("fork")  # the children inherit the counting decode_all
    listing = read_list(task / "test.txt", 47)
    procs = [ctx.Process(target=decode_cached, args=(listing, ResizeSquare(8), tmp_path / "cache", "t", False, 1))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(list(calls.iterdir())) == 1
    assert torch.equal(decode_cached(listing, ResizeSquare(8), tmp_path / "cache", "t"),
                       folder.decode_cached(listing, ResizeSquare(8), None))
