"""A task's splits, generated from (task, split, seed) only and written in NOAH's layout
(``<root>/<task>/{train800,val200,train800val200,test}.txt`` + ``images/<split>/*.png``)."""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Tuple

import torch

from .tasks import ProxyTask

VERSION = 4  # of the layout and the shared rendering; a generator of one task: its ProxyTask.version
SIZES = {"train800": 800, "val200": 200, "test": 1000}


def generate(task: ProxyTask, split: str, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One split of a task: a function of (task, split, seed) only."""
    key = zlib.crc32(f"{task.name}/{split}/{seed}".encode())
    return task.generate(torch.Generator().manual_seed(key), SIZES[split], split)


def write_task(task: ProxyTask, root, seed: int = 0) -> Path:
    """Write ``task`` in NOAH's layout under ``root/<task.name>`` unless a folder of this
    generator version (``VERSION`` and the task's own) and seed is there already. Written to a temporary folder and renamed, so
    concurrent runs never read a half-written task."""
    from PIL import Image

    folder = Path(root).expanduser() / task.name
    stamp = {"version": VERSION, "task_version": task.version, "seed": seed, "task": task.name, "sizes": SIZES}
    if (folder / "proxy.json").is_file() and json.loads((folder / "proxy.json").read_text()) == stamp:
        return folder
    tmp = folder.with_name(f".{task.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    lines = {}
    for split in SIZES:
        images, labels = generate(task, split, seed)
        (tmp / "images" / split).mkdir(parents=True)
        lines[split] = []
        for i, (im, y) in enumerate(zip(images.permute(0, 2, 3, 1).numpy(), labels.tolist())):
            rel = f"images/{split}/{i:06d}.png"
            Image.fromarray(im).save(tmp / rel)
            lines[split].append(f"{rel} {y}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (tmp / f"{split}.txt").write_text("".join(ls))
    (tmp / "proxy.json").write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race: use its (identical) folder
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
