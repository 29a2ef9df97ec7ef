#!/usr/bin/env python
"""Build VTAB-1k task folders (NOAH's layout) from tensorflow-datasets.

    python scripts/prepare_vtab.py                    # all 19 tasks
    python scripts/prepare_vtab.py cifar dtd kitti    # some (config names, NOAH folder names or aliases)
    python scripts/prepare_vtab.py --list             # the registry: splits, labels, sizes

Each task is read from its tfds builder with exactly task_adaptation's split strings and label transform
(peft_vit.data.vtab.TASKS) and written to <root>/<folder>/ (see datasets/README.md). tfds
downloads the source datasets into --data-dir first (TensorFlow needed); resisc45 and
retinopathy need a manual download, which the script names when it is missing.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from peft_vit.data.vtab import TASKS, get_task  # noqa: E402

DEFAULT_ROOT = Path(os.environ.get("PEFT_VIT_DATA", Path(__file__).resolve().parents[1] / "datasets")) / "vtab-1k"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks", nargs="*", help="tasks to prepare (default: all 19)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="vtab-1k root to write into (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="tfds data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None, help="where the manual downloads of resisc45/retinopathy are")
    p.add_argument("--no-download", action="store_true", help="use already prepared tfds data only")
    p.add_argument("--overwrite", action="store_true", help="rebuild task folders that already exist")
    p.add_argument("--list", action="store_true", help="print the task registry and exit")
    args = p.parse_args(argv)

    if args.list:
        for t in TASKS.values():
            print(f"{t.name:14s} {t.group:11s} C={t.num_classes:<3d} folder={t.folder:20s} {t.tfds_name}")
            print(f"{'':14s} val200={t.val200}  test={t.test} ({t.test_size:,})  label: {t.label}  "
                  f"flip(RLRR): {t.flip}")
        return 0
    try:
        tasks = [get_task(n) for n in args.tasks] or list(TASKS.values())
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.ERROR)  # tfds' notes on looking for prepared data first
    from peft_vit.data.tfds_source import prepare_task

    failed = 0
    for task in tasks:  # every task is tried and reported as it ends, not just up to the first failure
        try:
            res = "ok  " + str(prepare_task(task, args.root, data_dir=args.data_dir, download=not args.no_download,
                                            overwrite=args.overwrite, manual_dir=args.manual_dir))
        except Exception as e:
            failed += 1
            res = f"FAILED: {e}"
        print(f"{task.name:14s} {res}", flush=True)
    if failed:
        print(f"\n{failed} of {len(tasks)} tasks failed; see above.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
