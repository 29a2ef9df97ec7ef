"""What a run logs besides its record: the run logger (wandb or none), and the git commit and
package versions the record holds."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, TextIO


class _Tee:
    """A text stream that writes to the terminal's stream and to a log file."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... are the terminal's
        return getattr(self.stream, name)


@contextlib.contextmanager
def terminal_to_log(path: Path) -> Iterator[TextIO]:
    """Copy what the run prints on stdout (its header, evaluations, final line; tqdm's bar, on
    stderr, is left out) into ``path`` (the run dir's train.log, appended to). Yields the log file,
    for the error line the caller writes there."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        out, sys.stdout = sys.stdout, _Tee(sys.stdout, log)
        try:
            yield log
        finally:
            sys.stdout = out


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
