"""trainer.compile (issues 9, 22): the choice; a compiled training step (inductor, CPU) equal to the
eager one on a one-block tiny ViT with HTA, whose factors are batched once per forward by a hook;
every method through the loop's own compile path (one graph per training step, hook included, no
graph break, no recompile, evaluation leaves the training graph alone); host syncs per step."""
import copy
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, TINY_MODEL, build, compose
from peft_vit.engine import loop
from peft_vit.engine.loop import compile_enabled
from peft_vit.fingerprint import result_config
from peft_vit.methods import METHODS
from peft_vit.methods.base import BatchedDeltas
from peft_vit.record import RunContext

ONE_BLOCK = dict(TINY_MODEL, overrides=dict(TINY_MODEL["overrides"], depth=1))


def test_choice_defaults_to_off_and_auto_means_cuda_only():
    assert compose().trainer.compile is False
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="trainer.compile='yes': choose false"):
        compile_enabled("yes", torch.device("cpu"))


def _step(net, params, x, y):
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    opt.step()
    return loss.detach(), grads


@pytest.mark.slow
def test_compiled_step_equals_eager():
    eager = build("householder", ONE_BLOCK).train()
    with torch.no_grad():  # a non-trivial update, so that every factor carries a gradient
        for n, p in eager.named_parameters():
            if n.startswith("householder_pack.") and n.endswith((".d", ".w_in", ".w_out")):
                p.normal_(0, 0.1)
    model = copy.deepcopy(eager)
    assert any(isinstance(m, BatchedDeltas) for m in model.children())
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 7])
    torch._dynamo.reset()
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):  # plain C++ kernels: quicker to build
        net = torch.compile(model, backend="inductor")
        train = [p for p in model.parameters() if p.requires_grad]
        loss_c, grads_c = _step(net, train, x, y)
    loss_e, grads_e = _step(eager, [p for p in eager.parameters() if p.requires_grad], x, y)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)
    for (n, pc), pe in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pc, pe, atol=1e-6, rtol=1e-5, msg=n)
    torch._dynamo.reset()


def test_bad_value_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "model=vit_tiny_test", "dataset=demo/digits", "logger=none",
                        "trainer.num_workers=0", "trainer.progress=false", "trainer.epochs=1", "trainer.compile=yes",
                        f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "trainer.compile='yes': choose false" in r.stdout + r.stderr


def _set_up(method, tmp_path, *overrides):
    """The loop's own set-up of a run on the digits demo with the tiny ViT (2 blocks)."""
    cfg = compose("model=vit_tiny_test", "dataset=demo/digits", f"method={method}", "logger=none",
                  "trainer.num_workers=0", "trainer.progress=false", *overrides)
    with open_dict(cfg):
        del cfg["hydra"]  # as a run's config, resolved without Hydra
    r = loop.Run(cfg, RunContext(tmp_path), result_config(cfg), time.time())
    loop.set_up(r)
    loop.start_logging(r)
    return r


NO_STOP = SimpleNamespace(signum=None)


class CountingBackend:
    """torch.compile's "eager" backend that counts the graphs it is handed."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_graph_per_step_no_recompile_eval_leaves_it_alone(method, tmp_path, monkeypatch):
    """train, evaluate, train, evaluate through the loop's compile path: one graph (forward and
    the batched layers' hook), no graph break, nothing compiled by evaluation or the second cycle."""
    from torch._dynamo.utils import counters

    backend = CountingBackend()
    monkeypatch.setattr(loop, "COMPILE_BACKEND", backend)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compile_cache leaves it
    torch._dynamo.reset()
    counters.clear()
    r = _set_up(method, tmp_path, "trainer.compile=true")
    assert r.compiled and r.net is not r.model
    last2 = r.steps_per_epoch - 2  # the last two steps of each epoch
    with loop.progress_bar(r) as bar:
        loop.train_epoch(r, 0, last2, NO_STOP, bar)
        assert backend.graphs == 1, f"{method}: {backend.graphs} graphs for one training step"
        loop.evaluate_epoch(r, 0, say=lambda line: None)
        assert backend.graphs == 1, f"{method}: evaluation compiled a graph"
        loop.train_epoch(r, 1, last2, NO_STOP, bar)
        loop.evaluate_epoch(r, 1, say=lambda line: None)
    assert backend.graphs == 1, f"{method}: the second train/eval cycle recompiled"
    assert not counters["graph_break"], f"{method}: graph breaks {dict(counters['graph_break'])}"
    assert r.compile_time >= 0 and r.train_time > 0 and len(r.history) == 2
    torch._dynamo.reset()


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2", "unique_dim",
            "unique_consecutive", "allclose"}


class HostSyncs(TorchDispatchMode):
    """Counts the ops that read a tensor back to the host (a device sync on a GPU): ``.item()``,
    ``bool(t)``, ``nonzero``, data-dependent shapes."""

    def __init__(self, optimizer):
        super().__init__()
        self.count, self.optimizer = 0, optimizer

    def _step_count(self, t) -> bool:
        """The CPU optimiser's step counter (on CUDA the optimiser is fused: it stays on the device)."""
        return any(t is state.get("step") for state in self.optimizer.state.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS and not (args and self._step_count(args[0])):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_host_syncs_at_most_one_per_ten_steps(method, tmp_path):
    """A training epoch reads the loss back every 10 steps and at its end, nothing else; an
    evaluation reads back its two counts once."""
    r = _set_up(method, tmp_path)
    with loop.progress_bar(r) as bar, HostSyncs(r.optimizer) as syncs:
        loop.train_epoch(r, 0, 0, NO_STOP, bar)
        trained = syncs.count
        loop.evaluate_epoch(r, 0, say=lambda line: None)
    assert r.steps_per_epoch >= 10
    assert trained <= r.steps_per_epoch // 10 + 1, f"{method}: {trained} host syncs in {r.steps_per_epoch} steps"
    assert syncs.count - trained <= 2, f"{method}: {syncs.count - trained} host syncs in one evaluation"


def test_compile_cache_under_cache_dir_unless_the_environment_names_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    loop.compile_cache(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as inductor sets it on first use
    loop.compile_cache(tmp_path / "b")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "b" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    loop.compile_cache(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
