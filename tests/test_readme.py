"""The README's "add a method in one file" example works as printed: registers, trains its own
parameters only, starts at identity and merges exactly."""
import re
import shlex

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


def config_groups_in_tree():
    """{group: its options} for every folder of configs/ holding option files (``_*`` files are
    shared bases, not options); experiment_method/'s per-preset folders count as one group, and
    hydra/help (what --help shows) as none."""
    configs = REPO / "configs"
    groups = {}
    for f in configs.rglob("*.yaml"):
        group = f.parent.relative_to(configs).as_posix()
        if group == "." or f.name.startswith("_") or group == "hydra/help":
            continue
        group = "experiment_method" if group.startswith("experiment_method/") else group
        groups.setdefault(group, set()).add(f.stem)
    return groups


def test_readme_group_table_lists_every_config_group_and_option():
    text = (REPO / "README.md").read_text()
    table = text.split("`configs/config.yaml` composes these groups")[1].split("\n\n")[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("`"):
            rows[cells[0].strip("`").rstrip("/")] = cells[1]
    tree = config_groups_in_tree()
    assert sorted(rows) == sorted(tree)  # a new group (folder) must get its row
    assert "picked automatically" in rows.pop("experiment_method")
    for group, cell in rows.items():
        named = set(re.findall(r"`([a-z0-9_]+)`", cell))
        assert named == tree[group], (group, named ^ tree[group])  # a new option must be named in its row


def test_readme_set_up_is_venv_install_tests():
    text = (REPO / "README.md").read_text()
    block = text.split("## Set up\n")[1].split("```bash\n")[1].split("```")[0].splitlines()
    assert block[0] == "python -m venv .venv && source .venv/bin/activate"
    assert block[1] == "pip install -r requirements.txt"
    quick = shlex.split(block[2].split("#")[0])
    assert quick[:3] == ["pytest", "-m", "not slow"] and "quick check" in block[2]
    assert quick[3:] and all((REPO / f).is_file() for f in quick[3:])  # the quick check's files exist
    assert block[3].startswith('pytest -m "not slow"  ') and "end-to-end" in block[3]
    assert '"slow:' in (REPO / "pyproject.toml").read_text()  # the marker the quick command deselects
