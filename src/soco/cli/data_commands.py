"""`soco data ...`: assemble the built-in data sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from soco.data.photos import assemble_photos, photos_dir


def run(args: argparse.Namespace) -> int:
    """Dispatch `soco data DATASET`."""
    if args.data_set == "photos":
        dest = Path(args.dest) if args.dest else photos_dir()
        folder = assemble_photos(dest, progress=not args.print_path)
        if args.print_path:
            print(folder)
        else:
            count = sum(1 for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
            print(f"default photos: {count} images in {folder}")
        return 0
    raise AssertionError(args.data_set)
