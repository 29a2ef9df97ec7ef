"""scripts/export_merged.py end to end on the tiny ViT: train, save the trainable weights as the
loop does, export, load the file with timm alone, compare outputs."""
import importlib.util
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

import peft_vit
from conftest import REPO, TINY_MODEL

spec = importlib.util.spec_from_file_location("export_merged", REPO / "scripts" / "export_merged.py")
export_merged = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_merged)

OVERRIDES = ["experiment=quickstart", "method=rlrr", "method.drop=0.2"]


@pytest.fixture
def trained_run(tmp_path, tiny_input):
    """A run directory as the loop leaves it: .hydra/config.yaml and trainable.safetensors."""
    cfg = export_merged.compose_config(None, OVERRIDES)  # as Hydra writes <run>/.hydra/config.yaml
    torch.manual_seed(cfg.seed)  # as the loop does: the random tiny backbone is rebuilt from the seed
    model = peft_vit.build_model(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(tiny_input), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(run / "trainable.safetensors"))
    with torch.no_grad():
        ref = model(tiny_input)
    return run, ref


def _timm_load(path, num_classes=10):
    m = timm.create_model(TINY_MODEL["name"], pretrained=True, num_classes=num_classes, img_size=TINY_MODEL["img_size"],
                          **TINY_MODEL["overrides"], pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes))
    return m.eval()


def test_export_run_dir_loads_in_timm(trained_run, tmp_path, tiny_input):
    run, ref = trained_run
    out = tmp_path / "merged.safetensors"
    info = export_merged.main(["--run-dir", str(run), "--out", str(out)])
    assert info["method"] == "rlrr" and info["weights"].endswith("trainable.safetensors")
    model = _timm_load(out)
    assert type(model).__name__ == "VisionTransformer"
    with torch.no_grad():
        assert torch.allclose(model(tiny_input), ref, atol=1e-4)
    # the sidecar and the file's metadata say how to rebuild it; load_merged uses them
    meta = json.loads((tmp_path / "merged.safetensors.json").read_text())
    assert meta["timm_name"] == TINY_MODEL["name"]
    assert meta["timm_kwargs"] == dict(num_classes=10, img_size=TINY_MODEL["img_size"], **TINY_MODEL["overrides"])
    with torch.no_grad():
        assert torch.allclose(export_merged.load_merged(str(out)).eval()(tiny_input), ref, atol=1e-4)


def test_export_config_and_weights(trained_run, tmp_path, tiny_input):
    run, ref = trained_run
    out = tmp_path / "m.safetensors"
    export_merged.main(["--config", str(run / ".hydra" / "config.yaml"),
                        "--weights", str(run / "trainable.safetensors"), "--out", str(out)])
    with torch.no_grad():
        assert torch.allclose(_timm_load(out)(tiny_input), ref, atol=1e-4)


def test_overlay_needs_num_classes(trained_run, tmp_path, tiny_input):
    """Documents the timm trap the script's instructions avoid: a class count that differs from
    the pretrained config's (1000 here) makes timm drop the classifier from the file."""
    run, ref = trained_run
    out = tmp_path / "m.safetensors"
    export_merged.main(["--run-dir", str(run), "--out", str(out)])
    torch.manual_seed(123)
    m = timm.create_model(TINY_MODEL["name"], pretrained=True, num_classes=10, img_size=TINY_MODEL["img_size"],
                          **TINY_MODEL["overrides"], pretrained_cfg_overlay=dict(file=str(out))).eval()
    with torch.no_grad():
        assert not torch.allclose(m(tiny_input), ref, atol=1e-4)


def test_export_from_hydra_overrides(tmp_path):
    out = tmp_path / "init.safetensors"
    info = export_merged.main([*OVERRIDES, "--out", str(out)])
    assert info["weights"] is None and out.exists()
    assert _timm_load(out) is not None


def test_adapter_refuses_with_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="not mergeable"):
        export_merged.main(["experiment=quickstart", "method=adapter", "--out", str(tmp_path / "a.safetensors")])
    assert not (tmp_path / "a.safetensors").exists()


def test_weights_must_match_the_config(trained_run, tmp_path):
    run, _ = trained_run
    with pytest.raises(KeyError, match="does not have|lacks"):
        export_merged.main(["--config", str(run / ".hydra" / "config.yaml"), "method.ssf=false",
                            "--weights", str(run / "trainable.safetensors"), "--out", str(tmp_path / "x.safetensors")])
    from safetensors.torch import load_file

    head_only = {k: v for k, v in load_file(str(run / "trainable.safetensors")).items() if k.startswith("head.")}
    save_file(head_only, str(tmp_path / "head.safetensors"))
    with pytest.raises(KeyError, match="lacks"):
        export_merged.main(["--run-dir", str(run), "--weights", str(tmp_path / "head.safetensors"),
                            "--out", str(tmp_path / "y.safetensors")])
