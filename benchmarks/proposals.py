"""Benchmark the proposal algorithms: per-core speed, proposal counts, and how well `fast` covers `reference`.

Usage: python benchmarks/proposals.py [IMAGES_DIR] [--limit N] [--json OUT]

Every algorithm runs in this one process on one thread. Seconds per image are wall-clock; the
per-core rate and the speed ratio use the process's CPU time, which other jobs on a shared machine
do not inflate (and which would expose any helper thread a library started).
Coverage is the share of the reference's kept boxes (after SoCo's filter) that some kept box of the
fast algorithm matches at IoU >= 0.5 and >= 0.7. The reference always runs at the original
resolution, which takes tens of seconds on a 3000 px photo: use --limit to run on a subset.
"""

from __future__ import annotations

import os

# Before numpy, OpenCV and torch load: their thread pools read these once.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

try:
    import soco  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from soco.data.proposals.filter import FilterLevel, filter_proposals  # noqa: E402
from soco.data.proposals.selective_search import ALGORITHM_NAMES, get_algorithm  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
IOU_THRESHOLDS = (0.5, 0.7)
LARGE_PIXELS = 1_000_000  # images above one megapixel are reported apart: the reference slows down there


def default_image_paths() -> list[Path]:
    """The project's default photos, or the photo packages' files if soco.data.photos is missing."""
    try:
        from soco.data.photos import assemble_photos
    except ImportError:
        paths: list[Path] = []
        for package, folder, pattern in (
            ("mvtbdata", "images/campus", "*.png"),
            ("interior_photos", "images", "*.jpg"),
        ):
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                continue
            paths += sorted(Path(list(spec.submodule_search_locations)[0], folder).glob(pattern))
        return paths
    return list_images(Path(assemble_photos(progress=False)))


def list_images(folder: Path) -> list[Path]:
    """Image files under a folder, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def spread(paths: list[Path], limit: int | None) -> list[Path]:
    """At most `limit` paths taken evenly across the sorted list, so a subset mixes image sizes."""
    if limit is None or limit >= len(paths):
        return paths
    picks = np.unique(np.linspace(0, len(paths) - 1, num=max(limit, 1)).round().astype(int))
    return [paths[i] for i in picks]


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image as an upright RGB uint8 array."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def coverage(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Best IoU of each reference box with any candidate box (0 where there is no candidate)."""
    import torch
    from torchvision.ops import box_iou

    if len(reference) == 0:
        return np.zeros(0)
    if len(candidate) == 0:
        return np.zeros(len(reference))
    ious = box_iou(torch.from_numpy(reference.astype(np.float32)), torch.from_numpy(candidate.astype(np.float32)))
    return ious.max(dim=1).values.numpy()


def run(paths: list[Path]) -> dict:
    """Run every algorithm on every image and gather timings, counts and coverage."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    algorithms = {name: get_algorithm(name) for name in ALGORITHM_NAMES}
    # Warm-up on a small image so that lazy imports do not count against the first timed image.
    warm = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for algorithm in algorithms.values():
        algorithm(warm)

    per_image = []
    for index, path in enumerate(paths, 1):
        rgb = load_rgb(path)
        height, width = rgb.shape[:2]
        record: dict = {"image": path.name, "width": width, "height": height}
        kept_boxes = {}
        for name, algorithm in algorithms.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            raw = algorithm(rgb)
            seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            kept, level = filter_proposals(raw, width, height)
            kept_boxes[name] = kept
            record[name] = {"seconds": seconds, "cpu_seconds": cpu, "raw": len(raw), "kept": len(kept), "level": level.name}
        best = coverage(kept_boxes["reference"], kept_boxes["fast"])
        record["reference_kept_matched"] = {str(t): int((best >= t).sum()) for t in IOU_THRESHOLDS}
        # The converse share tells whether fast's extra boxes still look like reference boxes.
        best = coverage(kept_boxes["fast"], kept_boxes["reference"])
        record["fast_kept_matched"] = {str(t): int((best >= t).sum()) for t in IOU_THRESHOLDS}
        per_image.append(record)
        print(
            f"[{index}/{len(paths)}] {path.name} {width}x{height}: "
            + ", ".join(f"{n} {record[n]['seconds']:.2f}s ({record[n]['cpu_seconds']:.2f}s CPU)" for n in algorithms),
            file=sys.stderr,
            flush=True,
        )
    return summarise(per_image)


def summarise(per_image: list[dict]) -> dict:
    """Turn per-image records into the figures the table prints."""
    summary: dict = {"images": len(per_image), "algorithms": {}, "per_image": per_image}
    groups = {
        "all": per_image,
        f"<= {LARGE_PIXELS // 1_000_000} MP": [r for r in per_image if r["width"] * r["height"] <= LARGE_PIXELS],
        f"> {LARGE_PIXELS // 1_000_000} MP": [r for r in per_image if r["width"] * r["height"] > LARGE_PIXELS],
    }
    for name in ALGORITHM_NAMES:
        seconds = np.array([r[name]["seconds"] for r in per_image])
        cpu = np.array([r[name]["cpu_seconds"] for r in per_image])
        summary["algorithms"][name] = {
            "params": get_algorithm(name).params,
            "seconds_per_image": float(seconds.mean()),
            "cpu_seconds_per_image": float(cpu.mean()),
            "images_per_second_per_core": float(len(cpu) / cpu.sum()),
            "raw_per_image": float(np.mean([r[name]["raw"] for r in per_image])),
            "kept_per_image": float(np.mean([r[name]["kept"] for r in per_image])),
            "images_not_full_filter": sum(r[name]["level"] != FilterLevel.FULL.name for r in per_image),
        }
    summary["speed_ratio"] = {}
    for label, records in groups.items():
        if records:
            fast = sum(r["fast"]["cpu_seconds"] for r in records)
            reference = sum(r["reference"]["cpu_seconds"] for r in records)
            summary["speed_ratio"][label] = {"images": len(records), "ratio": reference / fast}
    for key, name in (("coverage", "reference"), ("fast_matched_by_reference", "fast")):
        total = sum(r[name]["kept"] for r in per_image)
        matched = f"{name}_kept_matched"
        summary[key] = {
            str(t): (sum(r[matched][str(t)] for r in per_image) / total if total else float("nan"))
            for t in IOU_THRESHOLDS
        }
    return summary


def print_table(summary: dict) -> None:
    """Print the summary as plain-text tables."""
    print(f"images: {summary['images']}")
    header = f"{'algorithm':<10} {'s/image':>9} {'cpu s/image':>12} {'images/s/core':>14} {'raw/image':>10} {'kept/image':>11} {'fallback':>9}"
    print(header)
    print("-" * len(header))
    for name, figures in summary["algorithms"].items():
        print(
            f"{name:<10} {figures['seconds_per_image']:>9.3f} {figures['cpu_seconds_per_image']:>12.3f} "
            f"{figures['images_per_second_per_core']:>14.2f} "
            f"{figures['raw_per_image']:>10.1f} {figures['kept_per_image']:>11.1f} {figures['images_not_full_filter']:>9d}"
        )
    print()
    for label, figures in summary["speed_ratio"].items():
        print(f"speed ratio reference/fast, CPU time ({label}, {figures['images']} images): {figures['ratio']:.1f}x")
    for threshold, share in summary["coverage"].items():
        print(f"reference kept boxes matched by a fast kept box at IoU >= {threshold}: {share:.3f}")
    for threshold, share in summary["fast_matched_by_reference"].items():
        print(f"fast kept boxes matched by a reference kept box at IoU >= {threshold}: {share:.3f}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images_dir", nargs="?", type=Path, help="folder of images (default: the project's photos)")
    parser.add_argument("--limit", type=int, default=None, help="use at most N images, spread over the sorted list")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures, per image too, as JSON")
    args = parser.parse_args(argv)

    paths = list_images(args.images_dir) if args.images_dir else default_image_paths()
    paths = spread(paths, args.limit)
    if not paths:
        print("no images found", file=sys.stderr)
        return 1
    summary = run(paths)
    print_table(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
