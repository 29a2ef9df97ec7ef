"""End to end: `python train.py dataset=vtab/<task>` on generated folders, one task per VTAB
group, and one FGVC dataset."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from peft_vit.data import vtab
from test_data_fgvc import make_fgvc
from test_data_folder import make_task

pytestmark = pytest.mark.slow


def train(tmp_path, *args, method="linear"):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", f"method={method}", "model=vit_tiny_test", "logger=none",
                        "trainer.epochs=1", "trainer.num_workers=0", "trainer.batch_size=8", "trainer.progress=false",
                        f"hydra.run.dir={out}", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (out / "results.json").is_file()
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("task", ["cifar", "eurosat", "smallnorb_ele"])  # natural, specialized, structured
def test_train_on_vtab_folder(tmp_path, task):
    t = vtab.TASKS[task]
    make_task(tmp_path / "vtab", t.folder, t.num_classes, counts={"train800": 12, "val200": 4, "test": 6})
    res = train(tmp_path, f"dataset=vtab/{task}", f"dataset.root={tmp_path / 'vtab'}")
    assert res["task"] == task and res["dataset"] == "vtab"
    assert (res["train_split"], res["eval_split"]) == ("train800val200", "test")


def test_train_on_fgvc(tmp_path):
    make_fgvc(tmp_path / "fgvc", "flowers", per_split=(4, 2, 3))
    res = train(tmp_path, "dataset=fgvc/flowers", f"dataset.root={tmp_path / 'fgvc'}", "protocol=tune")
    assert (res["task"], res["train_split"], res["eval_split"]) == ("flowers", "train", "val")


def test_fgvc_rlrr_preset_end_to_end(tmp_path):
    """experiment=fgvc_rlrr on CUB: square resize, 0.5 normalisation, restarting cosine."""
    make_fgvc(tmp_path / "fgvc", "cub", per_split=(4, 2, 3))
    res = train(tmp_path, "experiment=fgvc_rlrr", "dataset=fgvc/cub", f"dataset.root={tmp_path / 'fgvc'}",
                "trainer.epochs=2", "optim.restart_epochs=1", method="rlrr")
    assert (res["method"], res["task"], res["protocol"]) == ("rlrr", "cub", "final")
    assert (res["train_split"], res["eval_split"]) == ("train+val", "test")
    c = res["config"]
    assert (c["dataset"]["resize"], c["dataset"]["normalize"], c["optim"]["restart_epochs"]) == ("square", "half", 1)
    assert c["optim"]["lr"] == 3e-3 and c["method"]["drop"] == 0.1
