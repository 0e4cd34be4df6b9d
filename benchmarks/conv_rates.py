"""GFLOP/s of oneDNN's convolutions at ResNet-50-FPN shapes: forward, backward to the input, backward to the weight.

    .venv/bin/python benchmarks/conv_rates.py [--batch 8] [--threads 2]

Batch 8, NHWC and NCHW, fp32 and bf16; the median of 8 timings after 2 warm-ups. Beside a large matrix
product's rate (benchmarks/step_ceiling.py) it shows how close the step's convolutions run to the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

# (input channels, output channels, kernel, map side): ResNet-50 bottleneck and FPN shapes at 224 px
SHAPES = [(256, 256, 3, 56), (64, 64, 3, 56), (64, 256, 1, 56), (256, 64, 1, 56), (512, 128, 1, 28),
          (128, 128, 3, 28), (1024, 256, 1, 14), (256, 256, 3, 14)]


def median_milliseconds(function, repeats: int = 8) -> float:
    """Median wall time of `function()` in ms, after two warm-up calls."""
    for _ in range(2):
        function()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[repeats // 2] * 1e3


def main() -> None:
    """Print one line per shape, precision and memory format."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in (torch.float32, torch.bfloat16):
        for memory_format in (torch.channels_last, torch.contiguous_format):
            for cin, cout, kernel, side in SHAPES:
                images = torch.randn(args.batch, cin, side, side).to(dtype).contiguous(memory_format=memory_format)
                weight = torch.randn(cout, cin, kernel, kernel).to(dtype).contiguous(memory_format=memory_format)
                padding = kernel // 2
                upstream = torch.randn_like(torch.nn.functional.conv2d(images, weight, padding=padding))

                def forward(images=images, weight=weight, padding=padding):
                    return torch.nn.functional.conv2d(images, weight, padding=padding)

                def backward(mask, upstream=upstream, images=images, weight=weight, padding=padding):
                    return lambda: torch.ops.aten.convolution_backward(
                        upstream, images, weight, None, [1, 1], [padding] * 2, [1, 1], False, [0, 0], 1, mask)

                timings = [median_milliseconds(forward), median_milliseconds(backward([True, False, False])),
                           median_milliseconds(backward([False, True, False]))]
                megaflop = 2 * args.batch * cin * cout * kernel * kernel * side * side / 1e6
                rates = ", ".join(f"{megaflop / ms:.0f}" for ms in timings)
                layout = "NHWC" if memory_format == torch.channels_last else "NCHW"
                print(f"{str(dtype).removeprefix('torch.'):8s} {layout} {cin}->{cout} {kernel}x{kernel} at {side}: "
                      f"GFLOP/s forward, to input, to weight: {rates}")


if __name__ == "__main__":
    main()
