"""Config helpers for the entry point: option listing for bad choices and for ``--help``, what an
experiment preset covers (its methods, the rows of its per-task and per-method tables)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# the config groups of configs/ (the composed config's other top-level dicts are a preset's tables)
GROUPS = ("model", "method", "dataset", "optim", "trainer", "logger", "paths", "hydra")


def preset_methods(preset: str, config_dir: Path = CONFIG_DIR) -> List[str]:
    """The methods an experiment preset covers (has a recipe for): its default method (``override
    /method: X`` in its defaults), each method with a per-(preset, method) file
    ``configs/experiment_method/<preset>/<method>.yaml``, and the entries of a table the preset reads
    by method name (``${proxy_lr.${method.name}}``). Any other method runs with its own defaults
    and the preset's shared recipe, unless the preset reads such a table (then it is refused)."""
    from omegaconf import OmegaConf

    path = config_dir / "experiment" / f"{preset}.yaml"
    raw = OmegaConf.load(path)
    methods = [v for d in raw.get("defaults", []) if OmegaConf.is_dict(d)
               for k, v in d.items() if k.split()[-1] in ("/method", "method")]
    methods += sorted(p.stem for p in (config_dir / "experiment_method" / preset).glob("*.yaml"))
    for table in re.findall(r"\$\{(\w+)\.\$\{method\.name\}\}", path.read_text()):
        methods += list(raw[table])
    return list(dict.fromkeys(methods))


def recipe_gap(cfg, preset: Optional[str]) -> Optional[str]:
    """One line when the composed config reads a preset's table (``rlrr_hparams``, ``proxy_lr``,
    ...) at a row it lacks (a task without official values, a method without a tuned lr): which
    preset, which choice, and the rows the table has. None when the config resolves."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    try:
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
        return None
    except InterpolationKeyError as e:
        found = re.search(r"Interpolation key '([^']+)' not found", str(e))
        parts = found.group(1).split(".") if found else []
        if not parts or parts[0] in GROUPS or not OmegaConf.is_dict(cfg.get(parts[0])):
            raise
        node, path = cfg[parts[0]], [parts[0]]
        for part in parts[1:]:
            if part not in node or not OmegaConf.is_dict(node[part]):
                break
            node, path = node[part], path + [part]
        missing = parts[len(path)]
        choice = (f"method={missing}" if missing == OmegaConf.select(cfg, "method.name")
                  else f"dataset={cfg.dataset.name}/{cfg.dataset.task}"
                  if missing in (OmegaConf.select(cfg, "dataset.name"), OmegaConf.select(cfg, "dataset.task"))
                  else f"{'.'.join(parts[:len(path) + 1])}")
        return (f"experiment={preset or '?'} does not cover {choice}: {'.'.join(path)} has entries for "
                f"{', '.join(map(str, node))} only")


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> List[str]:
    """All options of a config group, nested ones included (``vtab/cifar``)."""
    root = config_dir / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_"))


# what --help lists, in this order: the groups a user picks from (experiment_method/ is picked by
# the experiment and the method; of hydra/, only the sweep launchers)
HELP_GROUPS = ("model", "method", "dataset", "optim", "trainer", "logger", "experiment", "hydra/launcher")


def readme() -> str:
    """OmegaConf resolver ``${peft_vit.readme:}`` for ``--help``: this checkout's README."""
    return str(CONFIG_DIR.parent / "README.md")


def config_groups(width: int = 100, config_dir: Path = CONFIG_DIR) -> str:
    """OmegaConf resolver ``${peft_vit.config_groups:}`` for ``--help`` (configs/hydra/help/peft_vit.yaml):
    one entry per group of :data:`HELP_GROUPS` with its options as the command line spells them
    (``vtab/cifar``), without the shared ``_base`` files the options include. Hydra's own
    ``$APP_CONFIG_GROUPS`` cannot leave those out, nor experiment_method/."""
    import textwrap

    pad = max(map(len, HELP_GROUPS)) + 2
    return "\n".join(textwrap.fill(", ".join(group_options(g, config_dir)), width, initial_indent=f"{g}:".ljust(pad),
                                   subsequent_indent=" " * pad, break_on_hyphens=False) for g in HELP_GROUPS)


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


def unknown_key(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> Optional[str]:
    """A ``group.key=value`` override whose key the composed group lacks (``method.rnak=4``): one line
    naming the closest valid keys (difflib). Hydra would suggest ``+method.rnak=4``, which adds a key
    the method's constructor then refuses. None when every key exists, for a multirun, or when the
    config does not compose (Hydra reports that itself)."""
    import difflib

    dotted = [a for a in argv if "=" in a and not a.startswith(("+", "~", "-", "hydra"))
              and "." in a.partition("=")[0] and a.partition("=")[0].split(".")[0] in GROUPS]
    if not dotted or any(a in ("-m", "--multirun") for a in argv):
        return None
    choices = [a for a in argv if "=" in a and not a.startswith(("-", "hydra", "~")) and "." not in a.partition("=")[0]]
    try:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(str(config_dir), version_base="1.3"):
            cfg = compose("config", overrides=choices)
    except Exception:  # noqa: BLE001 - Hydra names the problem when train.py composes
        return None
    for arg in dotted:
        key = arg.partition("=")[0]
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None)
        if not OmegaConf.is_dict(node) or leaf in node:
            continue
        close = difflib.get_close_matches(leaf, [str(k) for k in node], n=1, cutoff=0.5)
        owner = f"{parent} ({node.name})" if "name" in node and parent in ("method", "optim") else parent
        hint = f"did you mean {' or '.join(f'{parent}.{c}' for c in close)}? " if close else ""
        return (f"{arg}: {owner} has no key {leaf!r}; {hint}its keys: {', '.join(map(str, node))} "
                f"(python train.py --cfg job prints the composed config)")
    return None


def check_argv(argv: Sequence[str] = tuple(sys.argv[1:])) -> None:
    key = unknown_key(argv)
    if key:
        print(f"[peft-vit] unknown key: {key}", file=sys.stderr)
        raise SystemExit(1)
    msg = unknown_choice(argv)
    if msg:
        print(f"In 'config': {msg}", file=sys.stderr)
        raise SystemExit(1)
