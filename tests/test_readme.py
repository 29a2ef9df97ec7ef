"""The README's "add a method in one file" example works as printed: registers, trains its own
parameters only, starts at identity and merges exactly."""
import re

import torch
from omegaconf import OmegaConf

import peft_vit
from conftest import REPO, TINY_MODEL
from peft_vit.methods import METHODS


def test_readme_method_example(tiny_input):
    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(# peft_vit/methods/mymethod.py\n.*?)```", text, re.S).group(1)
    code = code.replace("from .base import", "from peft_vit.methods.base import")
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
        assert "mymethod" in METHODS
        cfg = OmegaConf.create({"model": TINY_MODEL, "method": {"name": "mymethod", "targets": ["q", "v"]}})
        torch.manual_seed(0)
        model = peft_vit.build_model(cfg).eval()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"head.weight", "head.bias"} | {
            f"blocks.{i}.attn.qkv.deltas.{b}.s" for i in range(2) for b in "qv"}
        torch.manual_seed(0)
        plain = peft_vit.build_model(OmegaConf.create({"model": TINY_MODEL, "method": {"name": "linear"}})).eval()
        assert torch.allclose(model(tiny_input), plain(tiny_input), atol=1e-6)  # s = 0: identity
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".s"):
                    p.normal_()
        out = model(tiny_input)
        merged = peft_vit.merge(model)
        assert type(merged) is type(plain)
        assert torch.allclose(merged(tiny_input), out, atol=1e-4)
    finally:
        METHODS.pop("mymethod", None)
