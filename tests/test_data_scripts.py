"""scripts/verify_data.py and scripts/benchmark_data.py on generated data."""
import importlib.util
import json
import sys

from conftest import REPO
from test_data_fgvc import make_fgvc
from test_data_folder import make_task


def script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # importable by name: its functions pickle into worker processes
    spec.loader.exec_module(mod)
    return mod


def test_verify_data_counts(tmp_path, capsys):
    vt, fg = tmp_path / "vtab-1k", tmp_path / "fgvc"
    make_task(vt, "kitti", 4, counts={"train800": 800, "val200": 200, "test": 711})
    make_task(vt, "cifar100", 100, counts={"train800": 5, "val200": 2, "test": 3})  # an alias, incomplete
    (vt / "cifar100" / "images" / "test" / "000001.jpg").unlink()
    make_fgvc(fg, "flowers", per_split=(2, 2, 2))
    verify = script("verify_data")
    assert verify.main(["kitti", "--vtab-root", str(vt), "--no-fgvc"]) == 0
    out = capsys.readouterr().out
    assert "kitti" in out and "800" in out and "711" in out and " ok" in out
    assert verify.main(["--vtab-root", str(vt), "--fgvc-root", str(fg)]) == 1
    out = capsys.readouterr().out
    cifar = next(line for line in out.splitlines() if line.startswith("cifar "))
    assert "cifar100" in cifar and "5!=800" in cifar and "3!=10,000 (1 missing)" in cifar and "INCOMPLETE" in cifar
    assert "dtd" in out and "MISSING" in out and "python scripts/prepare_vtab.py caltech101 dtd" in out
    flowers = next(line for line in out.splitlines() if line.startswith("flowers ") and "OxfordFlower" in line)
    assert "!=1,020" in flowers
    assert verify.main(["nope"]) == 2


def test_benchmark_data_generated(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert script("benchmark_data").main(["--generate", "--train", "20", "--test", "12", "--src-size", "40x30",
                                          "--img-size", "16", "--workers", "0", "--epochs", "1", "--batch", "8",
                                          "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for k in ("first_build_s", "from_cache_file_s", "train_img_s", "train_img_s_dataloader", "eval_img_s_cache",
              "eval_img_s_decode"):
        assert res[k] > 0, k
    assert len(list((tmp_path / "cache").glob("cifar-*.npy"))) == 2  # train800val200 and test
    assert "img/s" in capsys.readouterr().out
