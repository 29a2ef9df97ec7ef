"""trainer.compile (issue 9): the choice, and a compiled training step (inductor, CPU) equal to the
eager one on a one-block tiny ViT with HTA, whose factors are batched once per forward by a hook."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_MODEL, build
from peft_vit.engine.loop import compile_enabled
from peft_vit.methods.base import BatchedDeltas

ONE_BLOCK = dict(TINY_MODEL, overrides=dict(TINY_MODEL["overrides"], depth=1))


def test_choice_auto_means_cuda_only():
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="trainer.compile='yes': choose auto"):
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
    assert r.returncode != 0 and "trainer.compile='yes': choose auto" in r.stdout + r.stderr
