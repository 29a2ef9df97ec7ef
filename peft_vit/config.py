"""Config helpers for the entry point."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> List[str]:
    """All options of a config group, nested ones included (``vtab/cifar``)."""
    root = config_dir / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_"))


def unknown_choice(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> Optional[str]:
    """Hydra lists the options of a group only when they sit directly in its folder; for nested
    groups (``dataset=vtab/<task>``) say which options exist, before Hydra fails without a list."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("+", "~", "-", "hydra")):
            continue
        group, _, value = arg.partition("=")
        group = group.lstrip("+")
        if not (config_dir / group).is_dir() or "/" not in value:
            continue
        for choice in value.split(","):  # multirun: a,b,c
            choice = choice.strip()
            if choice and choice != "null" and not (config_dir / group / f"{choice}.yaml").is_file():
                opts = group_options(group, config_dir)
                return (f"Could not find '{group}/{choice}'\n\nAvailable options in '{group}':\n\t"
                        + "\n\t".join(opts))
    return None


def check_argv(argv: Sequence[str] = tuple(sys.argv[1:])) -> None:
    msg = unknown_choice(argv)
    if msg:
        print(f"In 'config': {msg}", file=sys.stderr)
        raise SystemExit(1)
