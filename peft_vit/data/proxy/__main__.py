"""``python -m peft_vit.data.proxy [root]``: write every proxy task under ``root``
(``datasets/proxy``); runs do it lazily otherwise."""
import sys

from . import TASKS, write_task

out = sys.argv[1] if len(sys.argv) > 1 else "datasets/proxy"
for t in TASKS.values():
    print(write_task(t, out))
