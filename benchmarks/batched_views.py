"""Does one call of the R50-FPN trunk at batch 16 beat two calls at batch 8 (V1 and V2 of one network)?

Usage:
    python benchmarks/batched_views.py [--precision bf16|fp32] [--pairs 4]

Forward and backward of soco's ResNet-50-FPN on 16 random 224 px images in channels-last, as two calls of
8 (how the methods call their networks: one view at a time) or one call of 16, alternating, 2 threads.
Batching the views of one network is only worth its per-view BatchNorm plumbing if this is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from soco.models.backbone import build_resnet_fpn


def step(network: torch.nn.Module, batches: list[torch.Tensor], precision: str) -> None:
    """One forward and backward over the batches, summing a mean of every FPN level."""
    network.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        total = sum(level.float().mean() for batch in batches for level in network(batch).values())
    total.backward()


def main() -> None:
    """Print the seconds per step of each way and their ratio, pair by pair."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    network = build_resnet_fpn(50, 256).to(memory_format=torch.channels_last)
    images = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    ways = {"two calls of 8": [images[:8].clone(), images[8:].clone()], "one call of 16": [images]}
    for _ in range(2):  # warm-up: oneDNN builds its kernels for each shape
        for batches in ways.values():
            step(network, batches, args.precision)
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.pairs):
        for name, batches in ways.items():
            start = time.perf_counter()
            step(network, batches, args.precision)
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        print(f"{args.precision} {name}: {', '.join(f'{v:.2f}' for v in values)} s (median {statistics.median(values):.2f})")
    ratios = [two / one for two, one in zip(seconds["two calls of 8"], seconds["one call of 16"])]
    print(f"two calls / one call, per pair: {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
