"""Benchmark per-level RoI pooling against the release's all-level pooling: encoder forward+backward on CPU.

Usage: python benchmarks/roi_pooling.py [--depth 50] [--size 224] [--batch 32] [--boxes 4]
                                         [--threads N] [--warmup 2] [--iters 5] [--json OUT]
Quick check: python benchmarks/roi_pooling.py --depth 18 --size 112 --batch 8

Both encoders (online network: backbone, FPN, box head, projector; in training mode) hold the same
weights. Their timed iterations alternate, so a machine shared with other work slows both alike;
the reported time per step is the median. Boxes are random, with sqrt(area) uniform between 32 px
and the view size and aspect ratio between 1/3 and 3, so they spread over the pyramid levels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import soco  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from soco.config.schema import ModelConfig  # noqa: E402
from soco.models.encoder import ObjectEncoder  # noqa: E402
from soco.models.roi_pooling import assign_levels  # noqa: E402


def random_boxes(batch: int, per_image: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, per_image, 4) boxes inside a size x size view with spread scales and aspects."""
    count = batch * per_image
    scales = torch.empty(count).uniform_(32.0, float(size), generator=generator)
    log_aspect = torch.empty(count).uniform_(-1.0986, 1.0986, generator=generator)  # ln 3
    widths = (scales * torch.exp(log_aspect / 2)).clamp(max=size)
    heights = (scales * torch.exp(-log_aspect / 2)).clamp(max=size)
    x1 = torch.rand(count, generator=generator) * (size - widths)
    y1 = torch.rand(count, generator=generator) * (size - heights)
    return torch.stack([x1, y1, x1 + widths, y1 + heights], dim=1).reshape(batch, per_image, 4)


def train_step(encoder: ObjectEncoder, images: torch.Tensor, boxes: torch.Tensor) -> float:
    """Seconds for one forward and backward pass of the encoder."""
    encoder.zero_grad(set_to_none=True)
    start = time.perf_counter()
    encoder(images, boxes).square().mean().backward()
    return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--size", type=int, default=224, help="view size in pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--boxes", type=int, default=4, help="boxes per image (K)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    return parser.parse_args()


def main() -> None:
    """Time both pooling ways and print images/s and their ratio."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    per_level = ObjectEncoder(ModelConfig(depth=args.depth)).train()
    all_levels = ObjectEncoder(ModelConfig(depth=args.depth, pool_all_levels=True)).train()
    all_levels.load_state_dict(per_level.state_dict())

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    boxes = random_boxes(args.batch, args.boxes, args.size, generator)
    level_counts = torch.bincount(assign_levels(boxes.reshape(-1, 4)), minlength=4).tolist()

    encoders = {"per_level": per_level, "all_levels": all_levels}
    for _ in range(args.warmup):
        for encoder in encoders.values():
            train_step(encoder, images, boxes)
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(args.iters):
        for name, encoder in encoders.items():
            seconds[name].append(train_step(encoder, images, boxes))

    medians = {name: statistics.median(times) for name, times in seconds.items()}
    images_per_second = {name: args.batch / median for name, median in medians.items()}
    speedup = images_per_second["per_level"] / images_per_second["all_levels"]
    print(
        f"R{args.depth}-FPN encoder, forward+backward, {args.batch} x {args.size}px, K={args.boxes}, "
        f"{args.threads} threads; boxes per level P2..P5: {level_counts}"
    )
    for name in encoders:
        print(f"  {name:>10}: {images_per_second[name]:8.2f} images/s  (median {medians[name] * 1000:.1f} ms/step)")
    print(f"  per_level / all_levels speed ratio: {speedup:.3f}")

    if args.json is not None:
        result = {
            "benchmark": "roi_pooling",
            "depth": args.depth,
            "size": args.size,
            "batch": args.batch,
            "boxes_per_image": args.boxes,
            "threads": args.threads,
            "warmup": args.warmup,
            "iters": args.iters,
            "boxes_per_level": level_counts,
            "seconds_per_step": seconds,
            "images_per_second": images_per_second,
            "speed_ratio_per_level_over_all_levels": speedup,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
