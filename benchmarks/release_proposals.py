"""soco's default proposals (`release`) against SoCo's release's own function: fidelity and CPU time, paired per image.

    python benchmarks/release_proposals.py [--photos DIR] [--side 500] [--limit 48] [--native DIR] [--json OUT]

The release's function is rebuilt from the installed `selectivesearch` 0.4 with the release's one changed line
(tests/reference/release_selective_search.py) and run with the release's parameters. Both sides then go through
SoCo's filter as the release computes it (rects with w = max - min: sides >= 32, aspect 1/3..3, relative scale
0.3..0.8). Images: the default photos (not the scikit-image ones) re-encoded at ImageNet size (JPEG, quality 90,
longer side --side), a spread of --limit of them; with --native, also every image of that folder as it is.
Timing: process CPU time in this one single-threaded process; per image the release's function runs once and
soco's three times (median), one right after the other, so the ratios are paired per image.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from soco.data.proposals.filter import FilterLevel, filter_proposals  # noqa: E402
from soco.data.proposals.selective_search import get_algorithm  # noqa: E402
from tests.reference.release_selective_search import release_filter, release_rects, rects_as_boxes  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def reencoded(path: Path, side: int) -> np.ndarray:
    """The photo at ImageNet size: longer side `side`, JPEG quality 90, decoded again as RGB uint8."""
    image = Image.open(path).convert("RGB")
    factor = side / max(image.size)
    image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(len(boxes), len(others)) IoU of x1 y1 x2 y2 boxes."""
    lo = np.maximum(boxes[:, None, :2], others[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda b: np.prod(b[:, 2:] - b[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(boxes)[:, None] + area(others)[None, :] - inter, 1e-9)


def matched(boxes: np.ndarray, others: np.ndarray, threshold: float) -> int:
    """How many of `boxes` have an IoU of at least `threshold` with one of `others`."""
    if len(boxes) == 0 or len(others) == 0:
        return 0
    return int((box_iou(boxes, others).max(axis=1) >= threshold).sum())


def compare(name: str, rgb: np.ndarray, algorithm) -> dict:
    """One image: the release's and soco's raw and kept boxes, their agreement and CPU times."""
    height, width = rgb.shape[:2]
    started = time.process_time()
    rects = release_rects(rgb)
    release_seconds = time.process_time() - started
    times = []
    for _ in range(3):
        started = time.process_time()
        ours = algorithm(rgb)
        times.append(time.process_time() - started)
    theirs_kept = rects_as_boxes(release_filter(rects, width, height))
    ours_kept, level = filter_proposals(ours, width, height)
    if level is not FilterLevel.FULL:  # the release keeps nothing there; soco falls back
        ours_kept = ours_kept[:0]
    return {
        "image": name, "width": width, "height": height,
        "raw_equal": bool(ours.shape == (len(rects), 4) and np.array_equal(ours, rects_as_boxes(rects))),
        "raw": [len(rects), len(ours)], "kept": [len(theirs_kept), len(ours_kept)],
        "recalled": matched(theirs_kept, ours_kept, 0.5), "precise": matched(ours_kept, theirs_kept, 0.5),
        "seconds": [release_seconds, statistics.median(times)],
    }


def summarise(rows: list[dict]) -> dict:
    """Pooled recall, precision, boxes per image and speed ratios of a set of images."""
    theirs, ours = sum(r["kept"][0] for r in rows), sum(r["kept"][1] for r in rows)
    ratios = [r["seconds"][0] / r["seconds"][1] for r in rows]
    return {
        "images": len(rows), "raw_equal_images": sum(r["raw_equal"] for r in rows),
        "recall@0.5": sum(r["recalled"] for r in rows) / max(theirs, 1),
        "precision@0.5": sum(r["precise"] for r in rows) / max(ours, 1),
        "kept_per_image": [theirs / len(rows), ours / len(rows)],
        "speed_total": sum(r["seconds"][0] for r in rows) / sum(r["seconds"][1] for r in rows),
        "speed_median": statistics.median(ratios), "speed_min": min(ratios),
        "seconds_per_image": [statistics.mean(r["seconds"][0] for r in rows),
                              statistics.mean(r["seconds"][1] for r in rows)],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print one line per set and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path.home() / ".cache/soco/photos")
    parser.add_argument("--side", type=int, default=500)
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--native", type=Path, default=None, help="a folder of images compared as they are")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # skimage's LBP on float images, inside the release's function
    algorithm = get_algorithm("release")
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                    and "skimage" not in p.relative_to(args.photos).parts)
    spread = [photos[round(i * (len(photos) - 1) / max(args.limit - 1, 1))] for i in range(min(args.limit, len(photos)))]
    algorithm(reencoded(spread[0], 64))  # compile before timing
    sets = {f"default photos re-encoded at {args.side} px": [
        compare(str(p.relative_to(args.photos)), reencoded(p, args.side), algorithm) for p in spread]}
    if args.native:
        sets[f"{args.native} as they are"] = [
            compare(p.name, np.asarray(Image.open(p).convert("RGB")), algorithm)
            for p in sorted(args.native.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    result = {name: {"summary": summarise(rows), "images": rows} for name, rows in sets.items()}
    for name, entry in result.items():
        print(name, json.dumps(entry["summary"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
