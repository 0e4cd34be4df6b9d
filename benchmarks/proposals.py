"""Benchmark soco's proposal algorithms against the `selectivesearch` package that SoCo's release copied.

Usage:
    python benchmarks/proposals.py [IMAGES_DIR] --package-src DIR [--algorithms fast,rich] [--limit N]
        [--jitter-sigma 0.8] [--repeats 3] [--json OUT]

The package is the reference and is not a dependency of soco: unpack its sdist (`pip download
--no-deps selectivesearch`, then `tar xzf`) and pass the folder that holds `selectivesearch/` as
--package-src. It runs with the parameters SoCo's selective search is quoted with (--package-params,
default scale=500, sigma=0.9, min_size=10); its rects (x, y, w, h with w = max - min) become boxes
(x, y, x + w, y + h), as the release used them. Both sides then go through SoCo's filter.

For each algorithm, against the package's kept boxes at IoU >= 0.5 and 0.7:
  recall     share of the package's kept boxes matched by one of ours,
  precision  share of our kept boxes matched by one of the package's,
and kept boxes per image on both sides. With --jitter-sigma the package runs a second time with
only its sigma changed, and the same figures for that run say how stable the reference itself is.

Timing: one process, one thread, CPU time (other jobs on a shared machine do not inflate it). Each
image runs the package once and each soco algorithm --repeats times (median kept), one right after
the other, so the speed ratio is paired per image; it is reported over all images (total package
time / total soco time) and per image (median and minimum).
The default images are the scikit-image photos of soco's default photo set (12 images, 303 px to
1411 px); the package takes minutes on the largest two (pure Python, superlinear in the region count).
"""

from __future__ import annotations

import os

# Before numpy, OpenCV and torch load: their thread pools read these once.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

try:
    import soco  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from soco.data.proposals.filter import filter_proposals
from soco.data.proposals.selective_search import ALGORITHM_NAMES, get_algorithm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
IOU_THRESHOLDS = (0.5, 0.7)
PACKAGE = "package"


def default_image_paths() -> list[Path]:
    """The scikit-image photos of the project's default photo set (assembled if missing)."""
    from soco.data.default_photos import assemble_photos

    return list_images(Path(assemble_photos(progress=False)) / "skimage")


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


def import_package(source: Path | None):
    """The `selectivesearch` module, from `source` (a folder holding selectivesearch/) or installed."""
    if source is not None:
        sys.path.insert(0, str(source))
    try:
        import selectivesearch
    except ImportError:
        sys.exit(
            "the selectivesearch package is not importable: pip download --no-deps selectivesearch, "
            "unpack it and pass the folder holding selectivesearch/ as --package-src"
        )
    return selectivesearch


def package_boxes(selectivesearch, rgb: np.ndarray, scale: float, sigma: float, min_size: int) -> np.ndarray:
    """The package's boxes, x1 y1 x2 y2 with x2 = x + w as the release used its rects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about LBP on float images, once per region pass
        _, regions = selectivesearch.selective_search(rgb, scale=scale, sigma=sigma, min_size=min_size)
    rects = np.array([region["rect"] for region in regions], dtype=np.float32).reshape(-1, 4)
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def best_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Best IoU of each box with any of the others (0 where there is none)."""
    import torch
    from torchvision.ops import box_iou

    if len(boxes) == 0 or len(others) == 0:
        return np.zeros(len(boxes))
    ious = box_iou(torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(others.astype(np.float32)))
    return ious.max(dim=1).values.numpy()


def timed(function, arguments: tuple, repeats: int) -> tuple[np.ndarray, float]:
    """The function's result on the arguments and its median CPU seconds over `repeats` calls."""
    seconds = []
    for _ in range(max(1, repeats)):
        start = time.process_time()
        result = function(*arguments)
        seconds.append(time.process_time() - start)
    return result, statistics.median(seconds)


def run(paths: list[Path], selectivesearch, names: list[str], package_params: tuple, jitter_sigma, repeats) -> dict:
    """Run the package and each soco algorithm on every image; gather timings, counts and matches."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    algorithms = {name: get_algorithm(name) for name in names}
    scale, sigma, min_size = package_params
    # Warm-up on a small image so that lazy imports do not count against the first timed image.
    warm = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    package_boxes(selectivesearch, warm, scale, sigma, min_size)
    for algorithm in algorithms.values():
        algorithm(warm)

    per_image = []
    for index, path in enumerate(paths, 1):
        rgb = load_rgb(path)
        height, width = rgb.shape[:2]
        record: dict = {"image": path.name, "width": width, "height": height, "results": {}}
        runs = {PACKAGE: (package_boxes, (selectivesearch, rgb, scale, sigma, min_size))}
        if jitter_sigma is not None:
            runs[f"package sigma={jitter_sigma}"] = (package_boxes, (selectivesearch, rgb, scale, jitter_sigma, min_size))
        runs.update({name: (algorithm, (rgb,)) for name, algorithm in algorithms.items()})
        kept = {}
        for name, (function, arguments) in runs.items():
            raw, seconds = timed(function, arguments, 1 if name.startswith(PACKAGE) else repeats)
            kept[name], _ = filter_proposals(raw, width, height)
            record["results"][name] = {"cpu_seconds": seconds, "raw": len(raw), "kept": len(kept[name])}
        for name in runs:
            if name == PACKAGE:
                continue
            ours_best = best_iou(kept[name], kept[PACKAGE])
            package_best = best_iou(kept[PACKAGE], kept[name])
            record["results"][name]["matched"] = {
                str(t): {"ours": int((ours_best >= t).sum()), "package": int((package_best >= t).sum())}
                for t in IOU_THRESHOLDS
            }
        per_image.append(record)
        print(
            f"[{index}/{len(paths)}] {path.name} {width}x{height}: "
            + ", ".join(f"{n} {r['cpu_seconds']:.3f}s/{r['kept']} kept" for n, r in record["results"].items()),
            file=sys.stderr,
            flush=True,
        )
    return summarise(per_image, list(runs))


def summarise(per_image: list[dict], names: list[str]) -> dict:
    """Turn per-image records into the figures the table prints."""
    summary: dict = {"images": len(per_image), "algorithms": {}, "per_image": per_image}
    package_cpu = np.array([r["results"][PACKAGE]["cpu_seconds"] for r in per_image])
    package_kept = sum(r["results"][PACKAGE]["kept"] for r in per_image)
    for name in names:
        cpu = np.array([r["results"][name]["cpu_seconds"] for r in per_image])
        kept = sum(r["results"][name]["kept"] for r in per_image)
        figures = {
            "params": get_algorithm(name).params if name in ALGORITHM_NAMES else None,
            "cpu_seconds_per_image": float(cpu.mean()),
            "kept_per_image": kept / len(per_image),
        }
        if name != PACKAGE:
            ratios = package_cpu / cpu
            figures.update(
                speed_ratio_total=float(package_cpu.sum() / cpu.sum()),
                speed_ratio_median=float(np.median(ratios)),
                speed_ratio_min=float(ratios.min()),
                kept_ratio=kept / package_kept if package_kept else float("nan"),
            )
            for t in IOU_THRESHOLDS:
                matched_package = sum(r["results"][name]["matched"][str(t)]["package"] for r in per_image)
                matched_ours = sum(r["results"][name]["matched"][str(t)]["ours"] for r in per_image)
                figures[f"recall@{t}"] = matched_package / package_kept if package_kept else float("nan")
                figures[f"precision@{t}"] = matched_ours / kept if kept else float("nan")
        summary["algorithms"][name] = figures
    return summary


def print_table(summary: dict) -> None:
    """Print the summary as a Markdown table."""
    print(f"images: {summary['images']}\n")
    print(
        "| run | recall@0.5 | precision@0.5 | recall@0.7 | precision@0.7 | kept / image | kept ratio "
        "| CPU s / image | speed ratio total | per image median | per image min |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, f in summary["algorithms"].items():
        if name == PACKAGE:
            print(f"| {name} | | | | | {f['kept_per_image']:.1f} | 1 | {f['cpu_seconds_per_image']:.3f} | 1 | 1 | 1 |")
            continue
        print(
            f"| {name} | {f['recall@0.5']:.3f} | {f['precision@0.5']:.3f} | {f['recall@0.7']:.3f} "
            f"| {f['precision@0.7']:.3f} | {f['kept_per_image']:.1f} | {f['kept_ratio']:.2f} "
            f"| {f['cpu_seconds_per_image']:.3f} | {f['speed_ratio_total']:.0f}x | {f['speed_ratio_median']:.0f}x "
            f"| {f['speed_ratio_min']:.0f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images_dir", nargs="?", type=Path, help="folder of images (default: the skimage photos)")
    parser.add_argument("--package-src", type=Path, default=None, help="folder holding the selectivesearch package")
    parser.add_argument("--package-params", default="500,0.9,10", help="the package's scale,sigma,min_size")
    parser.add_argument("--algorithms", default="fast,rich", help=f"soco algorithms, of {','.join(ALGORITHM_NAMES)}")
    parser.add_argument("--jitter-sigma", type=float, default=None, help="also run the package with this sigma")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each soco algorithm per image")
    parser.add_argument("--limit", type=int, default=None, help="use at most N images, spread over the sorted list")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures, per image too, as JSON")
    args = parser.parse_args(argv)

    names = [name.strip() for name in args.algorithms.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALGORITHM_NAMES]
    if unknown:
        parser.error(f"--algorithms: unknown {', '.join(unknown)}; valid: {', '.join(ALGORITHM_NAMES)}")
    try:
        scale, sigma, min_size = args.package_params.split(",")
        package_params = (float(scale), float(sigma), int(min_size))
    except ValueError:
        parser.error(f"--package-params: expected scale,sigma,min_size, got {args.package_params!r}")
    selectivesearch = import_package(args.package_src)
    paths = spread(list_images(args.images_dir) if args.images_dir else default_image_paths(), args.limit)
    if not paths:
        print("no images found", file=sys.stderr)
        return 1
    summary = run(paths, selectivesearch, names, package_params, args.jitter_sigma, args.repeats)
    summary["package_params"] = dict(zip(("scale", "sigma", "min_size"), package_params))
    print_table(summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
