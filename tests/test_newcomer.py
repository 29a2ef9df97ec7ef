"""What a new user sees, command by command (issue 23): the same command resumes or skips, known
errors in one line, data checked before the model, weight files named, values named by key, and
train.log holding what the terminal showed. Each test runs ``python train.py`` as a user would."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
ENV.pop("PEFT_VIT_TRACEBACK", None)
ENV.pop("HYDRA_FULL_ERROR", None)
TINY = ["model=vit_tiny_test", "dataset=demo/digits", "logger=none", "trainer.num_workers=0",
        "trainer.progress=false", "trainer.batch_size=64", "optim.warmup_epochs=0", "optim.lr=2e-3"]


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def run_dirs(root: Path):
    return sorted(p.parent for p in root.glob("runs/*/*/*/*/.hydra"))


def test_the_same_command_skips_a_finished_run_in_the_same_dir(tmp_path):
    args = [*TINY, "trainer.epochs=1", f"paths.output_root={tmp_path}"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    [d] = run_dirs(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{8}", d.name) and d.parent.name == "final-seed0", d
    assert f"-> {d / 'results.json'}" in first.stdout
    again = cli(*args[::-1], "trainer.progress=true")  # other order, a runtime key: the same run
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"skip: {d / 'results.json'} already exists" in again.stdout, again.stdout
    assert run_dirs(tmp_path) == [d]
    other = cli(*args, "seed=1")
    assert other.returncode == 0 and len(run_dirs(tmp_path)) == 2


@pytest.mark.slow
def test_ctrl_c_names_the_dir_and_the_command_that_resumes(tmp_path):
    args = [*TINY, "method=full", "trainer.epochs=6", "trainer.eval_every=1", f"paths.output_root={tmp_path}"]
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in p.stdout:
        if "epoch 1:" in line:
            p.send_signal(signal.SIGINT)
            break
    out = p.communicate(timeout=120)[0]
    [d] = run_dirs(tmp_path)
    assert p.returncode == 128 + signal.SIGINT, out
    said = re.search(r"signal 2: checkpoint saved at epoch \d+, step \d+ in (\S+); the same command resumes it: "
                     r"(python train\.py .*)", out)
    assert said and Path(said.group(1)) == d, out
    assert said.group(2).split()[2:] == args
    again = cli(*args)
    assert again.returncode == 0 and f"resumed from {d / 'checkpoint.pt'}" in again.stdout, again.stdout
    assert (d / "results.json").exists() and run_dirs(tmp_path) == [d]


def one_line_error(r, kind: str) -> str:
    """The known error's line: exit 1, no traceback, ``[peft-vit] <kind>: ...`` and the switch."""
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "HYDRA_FULL_ERROR" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "(the full trace: PEFT_VIT_TRACEBACK=1 python train.py ...)", lines
    [first] = [ln for ln in lines if ln.startswith("[peft-vit] ")]
    assert first.startswith(f"[peft-vit] {kind}: "), first
    return r.stderr


def test_without_data_and_weights_one_message_names_both_and_leaves_no_run_dir(tmp_path):
    missing = tmp_path / "ViT-B_16.safetensors"
    r = cli("dataset=vtab/cifar", f"dataset.root={tmp_path / 'vtab'}", f"model.checkpoint={missing}",
            "logger=none", f"paths.output_root={tmp_path / 'out'}")
    err = one_line_error(r, "DataMissingError")
    assert "VTAB-1k task 'cifar': no folder with train800val200.txt" in err and "prepare_vtab.py cifar" in err
    assert f"The weights are missing too: model.checkpoint file not found: {missing}" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    traced = cli("dataset=vtab/cifar", f"dataset.root={tmp_path / 'vtab'}", f"model.checkpoint={missing}",
                 "logger=none", f"paths.output_root={tmp_path / 'out'}", env={"PEFT_VIT_TRACEBACK": "1"})
    assert traced.returncode == 1 and "Traceback" in traced.stderr and "DataMissingError" in traced.stderr


def test_train_log_holds_what_the_terminal_showed(tmp_path):
    r = cli(*TINY, "trainer.epochs=2", "trainer.eval_every=1", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "train.log").read_text()
    shown = [ln for ln in r.stdout.splitlines() if ln.startswith("[peft-vit]")]
    assert len(shown) == 4 and all(ln in log for ln in shown), (shown, log)  # header, 2 evaluations, final


@pytest.mark.parametrize("arg, line", [
    ("trainer.epochs=0", "trainer.epochs=0: must be a whole number of epochs >= 1"),
    ("optim.lr=-1e-3", "optim.lr=-0.001: must be a learning rate > 0"),
])
def test_a_bad_value_is_named_by_its_key(tmp_path, arg, line):
    r = cli(*TINY, arg, f"paths.output_root={tmp_path}")
    err = one_line_error(r, "ConfigValueError")
    assert f"[peft-vit] ConfigValueError: {line}" in err
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_a_misspelled_method_key_names_the_closest_one_and_never_suggests_plus(tmp_path):
    r = cli(*TINY, "method=lora", "method.rnak=4", f"paths.output_root={tmp_path}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("[peft-vit] unknown key: method.rnak=4: method (lora) has no key 'rnak'; did you mean "
                                "method.rank? its keys: name, rank, alpha, dropout, targets, init "
                                "(python train.py --cfg job prints the composed config)"), r.stderr
    assert "+" not in r.stderr


@pytest.mark.parametrize("name, content, detected", [
    ("ViT-B_16.safetensors", b"<html><body>404 Not Found</body></html>\n", "a text file"),
    ("ViT-B_16.pth", bytes(range(7, 256)) * 16, "not a format this project reads"),
])
def test_an_unreadable_weights_file_names_its_path_format_and_the_formats_that_work(tmp_path, name, content,
                                                                                  detected):
    f = tmp_path / name
    f.write_bytes(content)
    r = cli(*TINY, f"model.checkpoint={f}", f"paths.output_root={tmp_path / 'out'}")
    err = one_line_error(r, "WeightsFileError")
    assert f"model.checkpoint {f} cannot be loaded (" in err and f"the file is {detected}" in err, err
    assert "Formats that work: .safetensors (safetensors), .pth / .pt / .bin (torch.save of a state dict), .npz" in err


def vtab_with_bad_images(tmp_path, empty_split, empty_name):
    """A generated cifar task with one truncated JPEG (train800, line 3 of train800val200.txt) and one
    zero-byte file (``empty_split/empty_name``)."""
    from test_sweep_local import make_vtab

    root = make_vtab(tmp_path / "vtab", tasks={"cifar": 100}, n_train=20, n_test=8)
    corrupt = root / "cifar" / "images" / "train800" / "000002.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    empty = root / "cifar" / "images" / empty_split / empty_name
    empty.write_bytes(b"")
    return root, corrupt, empty


def test_every_bad_image_of_a_list_in_one_message_with_its_line_and_the_fix(tmp_path):
    root, corrupt, empty = vtab_with_bad_images(tmp_path, "val200", "000001.jpg")
    r = cli(*TINY, "dataset=vtab/cifar", f"dataset.root={root}", "dataset.cache_dir=null",
            f"paths.output_root={tmp_path / 'out'}")
    err = one_line_error(r, "BadImageError")
    listed = root / "cifar" / "train800val200.txt"
    assert f"2 of 20 images of {listed} cannot be decoded; replace or re-download them" in err, err
    assert f"cannot decode image {corrupt} (listed at {listed}:3)" in err
    assert f"cannot decode image {empty} (listed at {listed}:18) (an empty file)" in err
    assert "scripts/verify_data.py" in err


def test_verify_data_decode_reports_every_bad_image_with_its_line(tmp_path):
    root, corrupt, empty = vtab_with_bad_images(tmp_path, "test", "000005.jpg")
    r = subprocess.run([sys.executable, "scripts/verify_data.py", "cifar", "--no-fgvc", "--decode",
                        "--vtab-root", str(root)], cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 image(s) cannot be decoded; replace or re-download them, or remove their lines from the list" in r.stdout
    assert f"cannot decode image {corrupt} (listed at {root / 'cifar' / 'train800val200.txt'}:3)" in r.stdout
    assert f"cannot decode image {empty} (listed at {root / 'cifar' / 'test.txt'}:6) (an empty file)" in r.stdout


def test_the_table_names_the_real_backbone_and_counts_the_seeds(tmp_path):
    for seed in (0, 1):
        r = cli(*TINY, "trainer.epochs=1", f"seed={seed}", "trainer.save_weights=false",
                f"paths.output_root={tmp_path}")
        assert r.returncode == 0, r.stderr[-2000:]
    t = subprocess.run([sys.executable, "scripts/make_table.py", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
                        "--print"], cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert t.returncode == 0, t.stderr[-2000:]
    assert "## demo — vit_tiny_patch16_224, top-1 accuracy (%)" in t.stdout.splitlines()
    rows = [ln for ln in t.stdout.splitlines() if ln.startswith("| linear ")]  # last epoch, best over epochs
    assert rows and all(row.endswith("| 2 |") for row in rows), rows  # two seeds (the CSV keeps their ids)
    assert "0,1" in (tmp_path / "rep" / "demo.csv").read_text()


@pytest.mark.slow
def test_a_local_sweep_prints_each_jobs_accuracy_and_leaves_no_stray_folder(tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", "hydra/launcher=local", "hydra.launcher.gpus_per_node=0", "hydra.launcher.array_parallelism=2",
            *TINY, "method=linear,full", "trainer.epochs=1", f"hydra.sweep.dir={sweep}", timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "2 of 2 jobs completed" in out
    for m in ("linear", "full"):
        assert re.search(rf"#\d : .*method={m}.*: test_acc \d+\.\d\d% -> {re.escape(str(sweep))}/\S+/results\.json", out), out
    assert not (sweep / ".submitit" / "%j").exists()


def tree_options(group: str):
    """The options of a config group as the command line spells them, read off configs/ directly."""
    root = REPO / "configs" / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_"))


def test_help_lists_only_what_a_user_picks_and_says_how_a_run_resumes():
    r = cli("--help", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert not re.search(r"(?<!\w)_base\b", out) and "experiment_method" not in out, out  # internal options
    listed = out.split("== Config groups (group=option) ==\n")[1].split("\n\n")[0].splitlines()
    groups, last = {}, None
    for line in listed:
        if line.startswith(" "):
            groups[last] += " " + line.strip()
        elif ":" in line and " " not in line.split(":")[0]:
            last, _, opts = line.partition(":")
            groups[last] = opts.strip()
    groups = {g: opts.split(", ") for g, opts in groups.items()}
    user_groups = sorted([p.name for p in (REPO / "configs").iterdir() if p.is_dir()
                          and p.name not in ("hydra", "experiment_method")] + ["hydra/launcher"])
    assert sorted(groups) == user_groups  # a new group shows up in --help by itself
    for g in user_groups:
        assert groups[g] == tree_options(g), g
    assert {"vtab/cifar", "fgvc/cub", "proxy/count", "demo/digits"} <= set(groups["dataset"])
    text = " ".join(out.split())
    assert ("A run's dir is outputs/runs/<method>/<dataset>-<task>/<protocol>-seed<seed>/<fingerprint>, a function "
            "of its config: the same command resumes a stopped run from its checkpoint") in text
    assert f"The README: {REPO / 'README.md'}" in out and "PEFT_VIT_TRACEBACK=1" in out
    assert "\nmethod:\n  name: linear\n" in out  # the composed config, as Hydra's help shows it


OFFLINE = '''\
import socket
_getaddrinfo = socket.getaddrinfo
def _offline(host, *args, **kwargs):  # no name resolves, as on a machine without network
    if host in ("localhost", "127.0.0.1", "::1"):
        return _getaddrinfo(host, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
socket.getaddrinfo = _offline
'''


@pytest.mark.tfds
def test_prepare_vtab_offline_fails_within_seconds_with_the_manual_route_and_leaves_no_lock(tmp_path):
    """The real script, tfds and all, on a machine whose network is cut (a sitecustomize that makes
    every name fail to resolve, whatever network the test machine has): before, tfds retried the
    download for 3.5 minutes and left ``.cifar.lock``."""
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "sitecustomize.py").write_text(OFFLINE)
    env = {k: v for k, v in ENV.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "offline"), *filter(None, [env.get("PYTHONPATH")])])
    root, tfds_dir = tmp_path / "data" / "vtab-1k", tmp_path / "tfds"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "scripts/prepare_vtab.py", "cifar", "--root", str(root), "--data-dir",
                        str(tfds_dir)], cwd=REPO, capture_output=True, text=True, timeout=150, env=env)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert took < 30, f"{took:.0f} s"  # 5-6 s measured on 2 cores, most of it importing tfds
    [line] = [ln for ln in r.stdout.splitlines() if ln.startswith("cifar ")]
    assert line.split(None, 1)[1] == (
        "FAILED: cifar: the download of cifar100:3.*.* could not be reached: www.cs.toronto.edu (gaierror: "
        "[Errno -2] Name or service not known). Without network use NOAH's image folders: unzip vtab-1k.zip so "
        f"that {root / 'cifar' / 'train800.txt'} exists (see datasets/README.md), or run python "
        "scripts/prepare_vtab.py cifar where there is network and copy cifar/ here."), line
    assert "1 of 1 tasks failed" in r.stderr
    assert "Retrying" not in r.stdout + r.stderr
    assert not list(tmp_path.rglob("*.lock")) and not (tmp_path / "data").exists()  # nothing left behind
