"""`soco proposals`, `soco proposals merge`, `soco inspect` and `soco show`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

from soco.config.loading import load_config, save_config, with_flags
from soco.data.proposals.filter import FilterLevel
from soco.data.proposals.pipeline import Shard, merge_stores, run_proposals
from soco.data.proposals.store import FAILED_LEVEL, ProposalStore
from soco.errors import DataError, ProposalStoreError


def run(args: argparse.Namespace) -> int:
    """Dispatch one of the proposal commands; a reader that stops reading (`| head`) ends it quietly."""
    handlers = {"proposals": proposals, "proposals-merge": merge, "inspect": inspect, "show": show}
    try:
        status = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        _silence_stdout()
        return 128 + signal.SIGPIPE  # what a shell reports for a command ended by SIGPIPE
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered at exit prints no error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (a captured one)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends
    finally:
        os.close(devnull)


def proposals(args: argparse.Namespace) -> int:
    """Compute or continue a proposal store for an image folder."""
    overrides = with_flags(args.overrides, [("--workers", "proposals.workers", args.workers),
                                            ("--algorithm", "proposals.algorithm", args.algorithm)])
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


def _per_image(values: np.ndarray) -> dict:
    """Mean, median, min and max of one count per image (zeros when there is no image)."""
    if not len(values):
        return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "min": int(values.min()),
        "max": int(values.max()),
    }


def store_summary(store: ProposalStore) -> dict:
    """Totals and per-readable-image statistics of a store, as shown by `soco inspect`."""
    levels = np.asarray(store.levels)
    valid = levels != FAILED_LEVEL
    raw_counts = np.asarray(store.raw_counts, dtype=np.int64)[valid]
    return {
        "store": str(store.folder),
        "images_root": store.meta.get("images_root"),
        "images": len(store),
        "failed": int((~valid).sum()),
        "proposals": int(store.meta["num_boxes"]),
        "proposals_per_image": _per_image(store.box_counts[valid]),
        "raw_proposals": int(raw_counts.sum()),
        "raw_proposals_per_image": _per_image(raw_counts),
        "filter_levels": {level.name.lower(): int((levels == level).sum()) for level in FilterLevel},
        "algorithm": store.algorithm,
        "algorithm_params": store.meta.get("algorithm_params"),
        "filter": store.meta.get("filter"),
        "bytes_on_disk": store.disk_bytes(),
        "bytes_per_image": store.disk_bytes() / max(1, len(store)),
    }


def _count_line(label: str, total: int, per_image: dict) -> str:
    """One line of totals and per-image statistics, labelled the same way for every count."""
    return (
        f"{label}: {total} in total; per readable image: mean {per_image['mean']:.1f}, median {per_image['median']:.1f}, "
        f"min {per_image['min']}, max {per_image['max']}"
    )


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
    print(f"store: {summary['store']} (images from {summary['images_root']})")
    print(f"algorithm: {summary['algorithm']} {json.dumps(summary['algorithm_params'])}")
    print(f"images: {summary['images']} ({summary['failed']} failed)")
    print(_count_line("proposals kept", summary["proposals"], summary["proposals_per_image"]))
    print(_count_line("proposals before the filter", summary["raw_proposals"], summary["raw_proposals_per_image"]))
    print("filter levels: " + ", ".join(f"{k} {v}" for k, v in summary["filter_levels"].items()))
    print(f"size: {summary['bytes_on_disk']} bytes in total, {summary['bytes_per_image']:.0f} per image")
    for path, reason in list(store.failures().items())[:20]:
        print(f"failed: {path}: {reason}")
    return 0


def show(args: argparse.Namespace) -> int:
    """Draw one image's proposals to a PNG."""
    from soco.data.image_files import read_image
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
    rgb, fingerprint = read_image(root / path)
    if store.levels[index] != FAILED_LEVEL and fingerprint != int(store.fingerprints[index]):
        raise ProposalStoreError(
            f"{root / path} changed since proposal store {store.folder} was made, so its boxes belong to the "
            f"old image: run `soco proposals {root} -o {store.folder}` to update the store"
        )
    boxes = store.boxes(index)
    level = FilterLevel(int(store.levels[index])).name.lower() if store.levels[index] >= 0 else "failed"
    title = f"{path}: {len(boxes)} proposals ({store.algorithm}, filter level {level})"
    output = draw_proposals(rgb, boxes, args.output, title)
    print(f"wrote {output}")
    return 0
