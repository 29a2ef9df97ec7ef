"""Shared test fixtures. Tests never touch the network: the hub is offline and models are
randomly initialised (tiny ViTs for behaviour, ViT-B/16 without weights for exact counts)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# a plain `pytest` writes nothing outside the repo and temp dirs: the decode cache (default
# ~/.cache/peft_vit) goes to a temp dir, for this process and every run it starts, removed at exit
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["PEFT_VIT_CACHE"] = tempfile.mkdtemp(prefix="peft-vit-test-cache-")
atexit.register(shutil.rmtree, os.environ["PEFT_VIT_CACHE"], True)
# tests that start a local SLURM cluster (scripts/slurm_local.sh: root, apt packages, daemons)
# run only when asked; .ci/run asks
SLURM_TESTS = os.environ.get("PEFT_VIT_SLURM_TESTS") == "1"
SLURM_HOW = ("set PEFT_VIT_SLURM_TESTS=1 to run them (as .ci/run does; needs root and apt-get, starts a "
             "private cluster with scripts/slurm_local.sh)")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# The tiny ViT of behaviour tests (configs/model/vit_tiny_test.yaml), with 10 classes
TINY_MODEL = dict(OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "vit_tiny_test.yaml")), num_classes=10)
VIT_B16 = dict(name="vit_base_patch16_224.orig_in21k", pretrained=False, checkpoint=None, num_classes=100,
               drop_path_rate=0.0, img_size=224, overrides={})


def compose(*overrides: str):
    """The composed Hydra config, as `python train.py <overrides>` would see it."""
    from hydra import compose as hcompose, initialize_config_dir

    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    if cfg.hydra.runtime.cwd is None:
        cfg.hydra.runtime.cwd = str(REPO)
    HydraConfig.instance().set_config(cfg)  # as during a run: ${hydra:...} interpolations resolve
    return cfg


def method_cfg(name: str, **kwargs):
    """configs/method/<name>.yaml with keyword overrides."""
    cfg = OmegaConf.load(CONFIGS / "method" / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, kwargs)
    return cfg


def build(method: str, model: dict = TINY_MODEL, **method_kwargs):
    import peft_vit

    torch.manual_seed(0)
    cfg = OmegaConf.create({"model": model, "method": method_cfg(method, **method_kwargs)})
    return peft_vit.build_model(cfg)


@pytest.fixture
def tiny_input():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


# A random tiny ViT with timm's jax (xavier) init: its features carry the input, unlike the
# std-0.02 default whose [CLS] output is nearly constant (a pretrained backbone's is not)
TINY_JAX = dict(TINY_MODEL, overrides=dict(TINY_MODEL["overrides"], weight_init="jax"))


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """One intra-op thread in this process: tiny models gain nothing from more, and a busy
    machine costs less. Tests that start processes set OMP_NUM_THREADS themselves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_steps(model, x=None, steps=3, lr=1e-2, seed=0):
    """A few AdamW steps (no weight decay: every change comes from a gradient), on `x` with
    labels 0..9 cycled, or on fresh random 32-px batches of 8. Returns the model in eval mode."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        xb, yb = (x, torch.arange(len(x)) % 10) if x is not None else \
            (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model.eval()


def assert_batched_equals_one_by_one(model, x):
    """The model's forward computes every delta's factors at once (a forward pre-hook);
    forward_features alone (no hook) runs each delta on its own: same outputs and gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    batched = model(x)
    g_batched = torch.autograd.grad(batched.square().sum(), params)
    one_by_one = model.forward_head(model.forward_features(x))
    g_one = torch.autograd.grad(one_by_one.square().sum(), params)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_batched, g_one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def digits_accuracy(model, epochs=8, lr=5e-3, batch=50):
    """Train on 1000 of sklearn's digits (32 px), report accuracy on the other 797."""
    import torch.nn.functional as F

    from peft_vit.data.digits import load_digits_tensors

    x, y = load_digits_tensors(32)
    x = (x.float() / 255 - 0.5) / 0.5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(1000, generator=g)
        for i in range(0, 1000, batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x[1000:]).argmax(-1) == y[1000:]).float().mean().item()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slurm`` are skipped unless PEFT_VIT_SLURM_TESTS=1."""
    if SLURM_TESTS:
        return
    mark = pytest.mark.skip(reason=f"SLURM cluster test: {SLURM_HOW}")
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(mark)


def pytest_terminal_summary(terminalreporter):
    n = sum("SLURM cluster test:" in str(r.longrepr) for r in terminalreporter.stats.get("skipped", []))
    if n:
        terminalreporter.write_line(f"skipped {n} SLURM cluster tests: {SLURM_HOW}", yellow=True)
