#!/usr/bin/env python
"""Export a trained run as a plain timm ViT: the method folded into the backbone's weights.

    # a finished run (its .hydra/config.yaml and trainable.safetensors)
    python scripts/export_merged.py --run-dir outputs/runs/rlrr/... --out rlrr_cifar.safetensors
    # a composed config file, plus the trained parameters
    python scripts/export_merged.py --config run/.hydra/config.yaml --weights run/trainable.safetensors --out m.safetensors
    # Hydra overrides, as `python train.py` takes them (random method init unless --weights)
    python scripts/export_merged.py method=rlrr experiment=quickstart --out m.safetensors

Frozen backbone weights are not in a run's files: the backbone is rebuilt from ``cfg.model`` (hub
cache or ``model.checkpoint=/path``), so pass the same weights the run used (add the override
``model.checkpoint=...`` if needed); a randomly initialised backbone (``model.pretrained=false``)
is rebuilt from the run's seed, as the loop builds it. The output is ``model.state_dict()`` of the merged
``VisionTransformer`` in safetensors; load it with timm alone::

    timm.create_model(name, pretrained=True, num_classes=C, img_size=..., **overrides,
                      pretrained_cfg_overlay=dict(file=PATH, num_classes=C))

``num_classes`` must also be in the overlay: otherwise timm sees a class count different from the
pretrained config's and silently drops the trained head. The exact kwargs are stored in the
file's metadata and in ``PATH.json`` (see :func:`load_merged`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from peft_vit.record import WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def compose_config(config: Optional[str], overrides: List[str]):
    """A composed config: a YAML file (plus dotted ``key=value`` overrides) or configs/ + overrides."""
    from omegaconf import OmegaConf

    if config:
        cfg = OmegaConf.load(config)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        return cfg
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def load_trainable(model, path: str) -> Dict[str, int]:
    """Load a safetensors (or torch) file of trainable tensors keyed by layer
    (:mod:`peft_vit.methods.weights`); every trainable tensor of ``model`` must be in it, and
    nothing in it may be unknown to ``model``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("trainable", state)
    from peft_vit.methods.weights import load_layer_state

    unexpected, absent = load_layer_state(model, state)  # by layer; older packed files converted
    if unexpected:
        raise KeyError(f"{path}: {len(unexpected)} tensors the model does not have, e.g. "
                       f"{unexpected[:3]}; was the run built with another method config?")
    if absent:
        raise KeyError(f"{path} lacks {len(absent)} trainable parameters, e.g. {absent[:3]}")
    return {"loaded_tensors": len(state)}


def timm_kwargs(mcfg: Dict[str, Any]) -> Dict[str, Any]:
    """The ``timm.create_model`` kwargs (besides the weight file) that rebuild the exported model."""
    return dict(num_classes=int(mcfg["num_classes"]), img_size=int(mcfg.get("img_size", 224)),
                **dict(mcfg.get("overrides") or {}))


def export(cfg, out: str, weights: Optional[str] = None) -> Dict[str, Any]:
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    import peft_vit

    # the loop seeds before building: a randomly initialised backbone (model.pretrained=false, the
    # quickstart) and the method's initial values are then rebuilt exactly
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = peft_vit.build_model(cfg)
    info: Dict[str, Any] = {}
    if weights:
        info.update(load_trainable(model, weights))
    method = model.peft_method
    counts = peft_vit.count_parameters(model)
    model.eval()
    peft_vit.merge(model)  # raises NotMergeableError (adapter) before touching the model
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    mcfg = OmegaConf.to_container(cfg["model"], resolve=True)
    name = mcfg["name"]
    kwargs = timm_kwargs(mcfg)
    meta = {"timm_name": name, "timm_kwargs": kwargs, "method": method.name,
            "method_config": OmegaConf.to_container(cfg["method"], resolve=True),
            "trainable_params": counts["trainable_params"],
            "trainable_params_no_head": counts["trainable_params_no_head"],
            "weights": weights}
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata={"format": "pt", "peft_vit": json.dumps(meta)})
    Path(str(out_path) + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    info.update(meta, out=str(out_path), tensors=len(state), dtype=str(next(iter(state.values())).dtype))
    return info


def load_merged(path: str, **extra):
    """Rebuild an exported model with timm alone, from the kwargs stored in the file."""
    import timm
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["peft_vit"])
    kwargs = dict(meta["timm_kwargs"], **extra)
    return timm.create_model(meta["timm_name"], pretrained=True, **kwargs,
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=kwargs["num_classes"]))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (or dotted key=value with --config/--run-dir)")
    ap.add_argument("--run-dir", help="a finished run: reads .hydra/config.yaml and trainable.safetensors")
    ap.add_argument("--config", help="a composed config YAML (e.g. <run>/.hydra/config.yaml)")
    ap.add_argument("--weights", help="safetensors of the trained parameters (the loop's trainable.safetensors)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    args = ap.parse_args(argv)

    config, weights = args.config, args.weights
    if args.run_dir:
        run = Path(args.run_dir)
        config = config or str(run / ".hydra" / "config.yaml")
        if weights is None and (run / WEIGHTS).exists():
            weights = str(run / WEIGHTS)
        if weights is None:
            raise SystemExit(f"{run} has no {WEIGHTS} (run with trainer.save_weights=true)")
    cfg = compose_config(config, args.overrides)
    if weights is None:
        print("[export] no --weights: exporting the method's initial parameters", file=sys.stderr)
    from peft_vit.methods import NotMergeableError

    try:
        info = export(cfg, args.out, weights)
    except NotMergeableError as e:
        raise SystemExit(f"[export] {e}")
    k = info["timm_kwargs"]
    print(f"[export] {info['method']} merged into {info['timm_name']} -> {info['out']} ({info['tensors']} tensors)")
    print(f"[export] load: timm.create_model({info['timm_name']!r}, pretrained=True, "
          + "".join(f"{a}={v!r}, " for a, v in k.items())
          + f"pretrained_cfg_overlay=dict(file={info['out']!r}, num_classes={k['num_classes']}))")
    return info


if __name__ == "__main__":
    main()
