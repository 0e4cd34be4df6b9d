"""Where one training step spends its time: torch.profiler over the trainer's own step (`soco bench`'s batch).

    .venv/bin/python benchmarks/profile_step.py --config soco_r50_fpn --batch-size 8 [key=value ...]

Prints the operators that take the most self CPU time, and writes the table to --output.
"""

from __future__ import annotations

from pathlib import Path

from step_setup import build_step, step_parser
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    """Profile a few steps after a warm-up step and print the heaviest operators."""
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    step = build_step(args)
    step.run(0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as profiler:
        for number in range(1, args.steps + 1):
            step.run(number)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(f"precision {step.precision}, batch {args.batch_size}, {args.steps} steps")
    print(table)
    if args.output:
        Path(args.output).write_text(table)


if __name__ == "__main__":
    main()
