"""Which configuration made a result: the config fingerprint, at the bottom of the package (the
loop, the run dir, the launchers and the report all read it).

A fingerprint is a hash of the flattened resolved config without the run-invariant keys,
those that change how or where a run happens, never what it computes (loader workers, progress
and log output, the logger, where data and outputs live, skip/resume/checkpoint/export switches,
torch.compile). They are declared once, as ``runtime_keys`` in ``configs/config.yaml``: the
fingerprint reads that list (:data:`RUNTIME_KEYS`), the report leaves them out of a run's
settings, and sweep job dirs leave their overrides out of their names (Hydra's
``override_dirname.exclude_keys`` interpolates the same list). A key there covers its children.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .config import CONFIG_DIR


def read_runtime_keys(config_dir: Path = CONFIG_DIR) -> Tuple[str, ...]:
    """The ``runtime_keys`` list of ``<config_dir>/config.yaml``, the one declaration."""
    from omegaconf import OmegaConf

    path = Path(config_dir) / "config.yaml"
    keys = OmegaConf.load(path).get("runtime_keys")
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{path}: runtime_keys must be a list of dotted config keys (the keys that never "
                         f"change a result); found {keys!r}")
    return tuple(keys)


RUNTIME_KEYS: Tuple[str, ...] = read_runtime_keys()


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def is_runtime_key(key: str) -> bool:
    """Whether the dotted ``key`` is a runtime key or lies under one."""
    return any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS)


def result_config(cfg: Any) -> Dict[str, Any]:
    """The flattened resolved config (a DictConfig or a plain dict) without :data:`RUNTIME_KEYS`."""
    from omegaconf import DictConfig, OmegaConf, open_dict

    if isinstance(cfg, DictConfig):
        declared = cfg.get("runtime_keys")
        if declared is not None and tuple(declared) != RUNTIME_KEYS:
            raise ValueError(f"runtime_keys={list(declared)} differs from configs/config.yaml's {list(RUNTIME_KEYS)}: "
                             f"the fingerprint reads the file; change the list there, not on the command line")
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.pop("hydra", None)  # a launcher's job config has it; the run's has not
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in _flatten(cfg).items() if not is_runtime_key(k)}


def fingerprint(flat: Dict[str, Any]) -> str:
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(old: Dict[str, Any], new: Dict[str, Any], limit: int = 8) -> List[str]:
    """``key: old -> new`` for each differing key (``<absent>`` where a side lacks it)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, KeyError) != new.get(k, KeyError))
    lines = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"... and {len(keys) - limit} more")
    return lines


def run_fingerprint(*, _root_) -> str:
    """OmegaConf resolver ``${peft_vit.fingerprint:}``: the fingerprint of the config it sits in
    (``hydra.run.dir`` names a single run's dir by it, so the same command, however its keys are
    spelled or ordered, and whatever its runtime keys, finds the same dir and resumes there). A
    config that does not resolve (a preset's table without this task's row) gets ``unresolved``:
    the run then stops with its own message (``config.recipe_gap``) and leaves no dir."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return fingerprint(result_config(_root_))[:8]
    except OmegaConfBaseException:
        return "unresolved"


def register_resolvers() -> None:
    """Register the configs' resolvers with OmegaConf (``train.py`` does, before Hydra composes):
    ``peft_vit.fingerprint`` (a single run's dir) and, for ``--help``, ``peft_vit.config_groups``
    and ``peft_vit.readme`` (peft_vit/config.py)."""
    from omegaconf import OmegaConf

    from .config import config_groups, readme

    for name, fn in {"peft_vit.fingerprint": run_fingerprint, "peft_vit.config_groups": config_groups,
                     "peft_vit.readme": readme}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
