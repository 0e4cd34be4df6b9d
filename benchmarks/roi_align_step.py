"""The training step with RoIAlign on NHWC maps in place against torchvision's kernel, alternating in one process.

    .venv/bin/python benchmarks/roi_align_step.py --config soco_r50_fpn --batch-size 8 --pairs 8 [key=value ...]

One model, one batch; the steps alternate between the two poolings (A B A B ...), so a machine whose speed
drifts slows both alike. Prints each pair's ratio (torchvision / in place) and their median.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from step_setup import build_step, step_parser

from soco.models import roi_pooling
from soco.models.roi_pooling import torchvision_align

IN_PLACE = roi_pooling._align


def main() -> None:
    """Alternate the two poolings over `--pairs` pairs of steps after one warm-up step of each."""
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    step = build_step(args)
    poolings = {"in_place": IN_PLACE, "torchvision": torchvision_align}
    seconds: dict[str, list[float]] = {name: [] for name in poolings}
    number = 0
    for round_number in range(args.pairs + 1):  # round 0 warms both up
        for name, pooling in poolings.items():
            roi_pooling._align = pooling
            started = time.perf_counter()
            step.run(number)
            if round_number:
                seconds[name].append(time.perf_counter() - started)
            number += 1
    roi_pooling._align = IN_PLACE
    ratios = [old / new for new, old in zip(seconds["in_place"], seconds["torchvision"])]
    result = {
        "config": args.config, "overrides": args.overrides, "batch_size": args.batch_size,
        "precision": step.precision, "channels_last": step.config.train.channels_last, "threads": torch.get_num_threads(),
        "seconds": seconds, "ratios_torchvision_over_in_place": ratios,
        "median_ratio": statistics.median(ratios),
        "median_seconds": {name: statistics.median(values) for name, values in seconds.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
