#!/usr/bin/env python
"""Check the data on disk: per VTAB-1k task, the images listed per split vs VTAB-1k's counts
(800 / 200 / 1000 / test size) and listed images that are missing; then the FGVC datasets
against VPT's split sizes.

    python scripts/verify_data.py                         # roots from $PEFT_VIT_DATA or ./datasets
    python scripts/verify_data.py --vtab-root /data/vtab-1k --fgvc-root /data/fgvc
    python scripts/verify_data.py cifar dtd --no-fgvc     # some tasks only
    python scripts/verify_data.py cifar --no-fgvc --decode   # also decode every image, naming each bad one

Exit status 0 when everything asked for is complete.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from peft_vit.data import fgvc, vtab  # noqa: E402
from peft_vit.data.folder import BAD_IMAGES_FIX, BadImageError, load_image, read_list  # noqa: E402

DATA = Path(os.environ.get("PEFT_VIT_DATA", Path(__file__).resolve().parents[1] / "datasets"))


def _cell(row) -> str:
    if row.get("error"):
        return "ERROR"
    if row["found"] is None:
        return "-"
    cell = f"{row['found']:,}"
    if row["found"] != row["expected"]:
        cell += f"!={row['expected']:,}"
    if row.get("missing"):
        cell += f" ({row['missing']:,} missing)"
    return cell


def undecodable(folder: Path, num_classes: int) -> list:
    """Every image of a VTAB-1k task's lists (train800val200 and test hold them all) that cannot be
    decoded, each message naming the file and its list line, in one pass."""
    bad = []
    for split in ("train800val200", "test"):
        if not (folder / f"{split}.txt").is_file():
            continue
        listing = read_list(folder / f"{split}.txt", num_classes)
        for i, path in enumerate(listing.paths):
            try:
                load_image(path, listing.where(i))
            except (BadImageError, FileNotFoundError) as e:
                bad.append(str(e))
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks", nargs="*", help="VTAB-1k tasks and/or FGVC datasets (default: all)")
    p.add_argument("--vtab-root", default=str(DATA / "vtab-1k"))
    p.add_argument("--fgvc-root", default=str(DATA / "fgvc"))
    p.add_argument("--no-vtab", action="store_true")
    p.add_argument("--no-fgvc", action="store_true")
    p.add_argument("--no-images", action="store_true", help="do not check that every listed image exists")
    p.add_argument("--decode", action="store_true",
                   help="VTAB-1k: decode every listed image and report each one that cannot be decoded, with its list line")
    args = p.parse_args(argv)

    names = [n.lower() for n in args.tasks]
    vt = [t for t in vtab.TASKS.values() if not names or t.name in names or any(n in names for n in t.folders)]
    fg = [d for d in fgvc.DATASETS.values() if not names or d.name in names]
    unknown = [n for n in names if n not in {t.name for t in vt} | {d.name for d in fg}
               and not any(n in (f.lower() for f in t.folders) for t in vt)]
    if unknown:
        print(f"unknown: {', '.join(unknown)}; VTAB-1k: {', '.join(vtab.TASKS)}; FGVC: {', '.join(fgvc.DATASETS)}",
              file=sys.stderr)
        return 2
    ok = True
    if vt and not args.no_vtab:
        print(f"VTAB-1k under {args.vtab_root}  (found images per split; != expected, missing files)")
        print(f"{'task':14s} {'folder':24s} {'train800':>10s} {'val200':>10s} {'train800val200':>15s} {'test':>18s}")
        missing = []
        for t in vt:
            r = vtab.check(t, args.vtab_root, images=not args.no_images)
            if r["folder"] is None:
                missing.append(t.name)
            folder = r["folder"].name if r["folder"] else "MISSING"
            cells = [_cell(r["splits"][s]) for s in ("train800", "val200", "train800val200", "test")]
            print(f"{t.name:14s} {folder:24s} {cells[0]:>10s} {cells[1]:>10s} {cells[2]:>15s} {cells[3]:>18s}"
                  f"  {'ok' if r['ok'] else 'INCOMPLETE'}")
            for row in r["splits"].values():
                if row["error"]:
                    print(f"    {row['error']}")
            ok &= r["ok"]
            bad = undecodable(r["folder"], t.num_classes) if args.decode and r["folder"] else []
            if bad:
                print(f"    {len(bad)} image(s) cannot be decoded; {BAD_IMAGES_FIX.split(';')[0]}:")
                print("\n".join(f"      {b}" for b in bad))
                ok = False
            elif args.decode and r["folder"]:
                print("    every listed image decodes")
        if missing:
            print(f"  missing tasks: NOAH's vtab-1k.zip, or python scripts/prepare_vtab.py {' '.join(missing)}")
    if fg and not args.no_fgvc:
        print(f"\nFGVC under {args.fgvc_root}  (VPT's split files)")
        print(f"{'dataset':14s} {'folder':24s} {'train':>18s} {'val':>18s} {'test':>18s}")
        for d in fg:
            r = fgvc.check(d, args.fgvc_root, images=not args.no_images)
            folder = r["folder"].name if r["folder"] else "MISSING"
            cells = [_cell(r["splits"][s]) if s in r["splits"] else "-" for s in fgvc.SPLITS]
            print(f"{d.name:14s} {folder:24s} {cells[0]:>18s} {cells[1]:>18s} {cells[2]:>18s}"
                  f"  {'ok' if r['ok'] else 'INCOMPLETE'}")
            if r["error"] and r["folder"]:
                print(f"    {r['error']}")
            ok &= r["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
