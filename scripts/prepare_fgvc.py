#!/usr/bin/env python
"""FGVC data (VPT's splits; docs/REFERENCE.md §3): what is expected where, and what is missing.

    python scripts/prepare_fgvc.py --check              # all five datasets
    python scripts/prepare_fgvc.py --check cub dogs --root /data/fgvc

The images come from each dataset's own site and the split files from VPT (github.com/KMnP/vpt,
"Dataset preparation"); neither can be fetched from here without a login or a browser, so this
script checks a tree you have put together and says, per dataset, what to fetch and where to put
it (also in datasets/README.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from peft_vit.data import fgvc  # noqa: E402

DEFAULT_ROOT = Path(os.environ.get("PEFT_VIT_DATA", Path(__file__).resolve().parents[1] / "datasets")) / "fgvc"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="*", help=f"some of {', '.join(fgvc.DATASETS)} (default: all)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="FGVC root (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="report what is present and what is missing (the default)")
    p.add_argument("--no-images", action="store_true", help="skip checking that every listed image exists")
    args = p.parse_args(argv)
    try:
        sets = [fgvc.get_dataset(n) for n in args.datasets] or list(fgvc.DATASETS.values())
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    ok = True
    for d in sets:
        r = fgvc.check(d, args.root, images=not args.no_images)
        img = f"{d.image_dir}/" if d.image_dir else ""
        print(f"{d.name} ({d.title}, {d.num_classes} classes): {'ok' if r['ok'] else 'INCOMPLETE'}")
        if r["folder"] is None:
            print(f"  missing: {Path(args.root) / d.folder}/  (accepted names: {', '.join(d.folders)})")
            print(f"  put the images under {Path(args.root) / d.folder}/{img} (from {d.homepage})")
            print(f"  and VPT's train.json, val.json, test.json in {Path(args.root) / d.folder}/")
        else:
            for split, row in r["splits"].items():
                if row["found"] is None:
                    print(f"  {split}.json: MISSING (expected {row['expected']:,} images)")
                    continue
                state = "ok" if row["found"] == row["expected"] else f"expected {row['expected']:,}"
                miss = f", {row['missing']:,} listed images missing under {r['folder']}/{img}" if row["missing"] else ""
                print(f"  {split}.json: {row['found']:,} images ({state}){miss}")
            if r["error"]:
                print(f"  error: {r['error']}")
        ok &= r["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
