"""How far the training step is from this machine's arithmetic ceiling: FLOPs, convolution rate, matrix-product peak.

    .venv/bin/python benchmarks/step_ceiling.py --config soco_r50_fpn --batch-size 8 [key=value ...]

Counts the FLOPs of one step (torch.utils.flop_counter), profiles a few steps to find how long the
convolutions take, and times a large matrix product in the step's precision as the machine's attainable
peak. From these it prints the fastest step the machine could run if the convolutions ran at that peak,
and if everything but the convolutions took no time at all: the bounds any speed-up of the same work meets.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from step_setup import Step, build_step, step_parser
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

CONVOLUTION_OPERATORS = ("aten::convolution", "aten::convolution_backward", "aten::mkldnn_convolution",
                         "aten::_convolution")


def matmul_peak_gflops(dtype: torch.dtype, side: int = 2048, repeats: int = 10) -> float:
    """The median rate of a side x side x side matrix product, in GFLOP/s: the attainable arithmetic peak."""
    first, second = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
    for _ in range(3):
        first @ second
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        first @ second
        seconds.append(time.perf_counter() - started)
    return 2 * side**3 / sorted(seconds)[repeats // 2] / 1e9


def flops_by_operator(step: Step) -> dict[str, int]:
    """FLOPs of one whole step (forward, backward, update) per ATen operator."""
    with FlopCounterMode(display=False) as counter:
        step.run(1)
    return {str(operator): int(flops) for operator, flops in counter.get_flop_counts()["Global"].items()}


def convolution_seconds(step: Step, steps: int) -> tuple[float, float]:
    """(median wall seconds of a step, convolution self CPU seconds per step) over `steps` profiled steps."""
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for number in range(steps):
            started = time.perf_counter()
            step.run(2 + number)
            walls.append(time.perf_counter() - started)
    self_time = defaultdict(float)
    for event in profiler.key_averages():
        self_time[event.key] += event.self_cpu_time_total / 1e6
    convolution = sum(seconds for name, seconds in self_time.items()
                      if any(name.startswith(op) for op in CONVOLUTION_OPERATORS))
    return sorted(walls)[steps // 2], convolution / steps


def main() -> None:
    """Print (and optionally write as JSON) the step's FLOPs, rates and ceilings."""
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    step = build_step(args)
    step.run(0)  # warm-up: oneDNN primitives, allocator

    flops = flops_by_operator(step)
    convolution_flops = sum(v for k, v in flops.items() if "convolution" in k)
    step_seconds, conv_seconds = convolution_seconds(step, args.steps)
    peak = matmul_peak_gflops(torch.bfloat16 if step.precision == "bf16" else torch.float32)
    conv_rate = convolution_flops / conv_seconds / 1e9
    other_seconds = step_seconds - conv_seconds
    conv_at_peak = convolution_flops / peak / 1e9
    result = {
        "config": args.config, "overrides": args.overrides, "precision": step.precision,
        "channels_last": step.config.train.channels_last, "threads": torch.get_num_threads(),
        "step_seconds": step_seconds, "total_gflop": sum(flops.values()) / 1e9,
        "convolution_gflop": convolution_flops / 1e9, "gflop_by_operator": {k: v / 1e9 for k, v in flops.items()},
        "convolution_seconds": conv_seconds, "convolution_share": conv_seconds / step_seconds,
        "convolution_gflops_per_second": conv_rate, "matmul_peak_gflops_per_second": peak,
        "convolution_rate_of_peak": conv_rate / peak,
        "step_if_convolutions_at_peak": conv_at_peak + other_seconds,
        "step_if_only_convolutions": conv_seconds,
        "step_if_only_convolutions_at_peak": conv_at_peak,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
