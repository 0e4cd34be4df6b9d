"""`soco proposals`, `soco proposals merge`, `soco inspect` and `soco show`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from soco.config.loading import load_config, save_config
from soco.data.proposals.filter import FilterLevel
from soco.data.proposals.pipeline import Shard, merge_stores, run_proposals
from soco.data.proposals.store import FAILED_LEVEL, ProposalStore
from soco.errors import DataError


def run(args: argparse.Namespace) -> int:
    """Dispatch one of the proposal commands."""
    handlers = {"proposals": proposals, "proposals-merge": merge, "inspect": inspect, "show": show}
    return handlers[args.command](args)


def proposals(args: argparse.Namespace) -> int:
    """Compute or continue a proposal store for an image folder."""
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"proposals.workers={args.workers}")
    if args.algorithm is not None:
        overrides.append(f"proposals.algorithm={args.algorithm}")
    config = load_config(args.config or "default", overrides)
    shard = Shard.parse(args.shard) if args.shard else Shard()
    summary = run_proposals(args.images, args.output, config.proposals, shard, progress=not args.quiet)
    save_config(config, Path(args.output) / "config.yaml")
    for line in summary.lines():
        print(line)
    return 0


def merge(args: argparse.Namespace) -> int:
    """Merge shard outputs into one store."""
    store = ProposalStore(merge_stores(args.sources, args.output))
    print(f"merged {len(args.sources)} folders into {store.folder}: {len(store)} images")
    return 0


def store_summary(store: ProposalStore) -> dict:
    """Counts and statistics of a store, as shown by `soco inspect`."""
    levels = np.asarray(store.levels)
    valid = levels != FAILED_LEVEL
    counts = store.box_counts[valid]
    return {
        "store": str(store.folder),
        "images_root": store.meta.get("images_root"),
        "images": len(store),
        "failed": int((~valid).sum()),
        "proposals": int(store.meta["num_boxes"]),
        "proposals_per_image": {
            "mean": float(counts.mean()) if len(counts) else 0.0,
            "median": float(np.median(counts)) if len(counts) else 0.0,
            "min": int(counts.min()) if len(counts) else 0,
            "max": int(counts.max()) if len(counts) else 0,
        },
        "raw_proposals_per_image": float(np.asarray(store.raw_counts)[valid].mean()) if valid.any() else 0.0,
        "filter_levels": {level.name.lower(): int((levels == level).sum()) for level in FilterLevel},
        "algorithm": store.algorithm,
        "algorithm_params": store.meta.get("algorithm_params"),
        "filter": store.meta.get("filter"),
        "bytes_on_disk": store.disk_bytes(),
        "bytes_per_image": store.disk_bytes() / max(1, len(store)),
    }


def inspect(args: argparse.Namespace) -> int:
    """Print a store's summary, or with --json every image's boxes."""
    store = ProposalStore(args.store)
    summary = store_summary(store)
    if args.json:
        failures = store.failures()
        images = []
        for index in range(len(store)):
            path = store.path(index)
            width, height = (int(v) for v in store.sizes[index])
            entry = {"path": path, "width": width, "height": height, "level": int(store.levels[index])}
            entry["boxes"] = store.boxes(index).round(2).tolist()
            if path in failures:
                entry["failure"] = failures[path]
            images.append(entry)
        json.dump({"summary": summary, "images": images}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    per_image = summary["proposals_per_image"]
    print(f"store: {summary['store']} (images from {summary['images_root']})")
    print(f"algorithm: {summary['algorithm']} {json.dumps(summary['algorithm_params'])}")
    print(f"images: {summary['images']} ({summary['failed']} failed)")
    print(
        f"proposals: {summary['proposals']}; per image mean {per_image['mean']:.1f}, "
        f"median {per_image['median']:.0f}, min {per_image['min']}, max {per_image['max']} "
        f"(raw before filter: {summary['raw_proposals_per_image']:.0f})"
    )
    print("filter levels: " + ", ".join(f"{k} {v}" for k, v in summary["filter_levels"].items()))
    print(f"size: {summary['bytes_on_disk']} bytes ({summary['bytes_per_image']:.0f} per image)")
    for path, reason in list(store.failures().items())[:20]:
        print(f"failed: {path}: {reason}")
    return 0


def show(args: argparse.Namespace) -> int:
    """Draw one image's proposals to a PNG."""
    from soco.data.images import load_rgb
    from soco.data.proposals.drawing import draw_proposals

    store = ProposalStore(args.store)
    if args.image is None:
        index = 0
    elif args.image.isdigit() and args.image not in store:
        index = int(args.image)
        if index >= len(store):
            raise DataError(f"{store.folder} has {len(store)} images; index {index} is out of range")
    else:
        try:
            index = store.index_of(args.image)
        except KeyError:
            raise DataError(
                f"{store.folder} has no image '{args.image}' (paths are relative to "
                f"{store.meta.get('images_root')}, e.g. '{store.path(0)}')"
            ) from None
    root = Path(args.images) if args.images else Path(store.meta["images_root"])
    path = store.path(index)
    rgb = load_rgb(root / path)
    boxes = store.boxes(index)
    level = FilterLevel(int(store.levels[index])).name.lower() if store.levels[index] >= 0 else "failed"
    title = f"{path}: {len(boxes)} proposals ({store.algorithm}, filter level {level})"
    output = draw_proposals(rgb, boxes, args.output, title)
    print(f"wrote {output}")
    return 0
