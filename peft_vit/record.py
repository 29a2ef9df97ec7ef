"""The per-run record (results.json, written atomically) and the run logger (wandb or none)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, Iterator, Optional

RESULTS = "results.json"


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``. A reader
    sees the old file or the whole new one, never a partial one, and concurrent writers never
    interleave. On error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj: Dict[str, Any]) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
        f.write("\n")


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchvision", "timm", "hydra-core", "omegaconf", "numpy", "peft-vit"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    import platform

    out["python"] = platform.python_version()
    return out


class RunLogger:
    """wandb (online/offline/disabled) or nothing. Only rank 0 creates one."""

    def __init__(self, lcfg, run_cfg: Dict[str, Any], out_dir: Path, name: str, group: Optional[str], tags):
        self.run = None
        if lcfg.get("name", "none") == "none" or lcfg.get("mode") == "disabled":
            return
        import wandb

        self.run = wandb.init(project=lcfg.get("project"), entity=lcfg.get("entity"), mode=lcfg.get("mode", "offline"),
                              dir=str(out_dir), name=name, group=lcfg.get("group") or group,
                              tags=list(lcfg.get("tags") or []) + list(tags), config=run_cfg, reinit="finish_previous")

    def log(self, data: Dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: Dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in data.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
