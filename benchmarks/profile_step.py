"""Where one training step spends its time: torch.profiler over the trainer's own step (`soco bench`'s batch).

    .venv/bin/python benchmarks/profile_step.py --config soco_r50_fpn --batch-size 8 [key=value ...]

Prints the operators that take the most self CPU time, and writes the table to --output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from soco.cli.pretrain_command import resolve_data
from soco.config.loading import load_config
from soco.engine.bench import bench_dataset, first_batch
from soco.engine.distributed import DistributedContext, resolve_device
from soco.engine.optimizers import build_optimizer
from soco.engine.step import StepRunner
from soco.engine.trainer import build_model


def main() -> None:
    """Profile a few steps after a warm-up step and print the heaviest operators."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="soco_r50_fpn")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--output", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, [f"train.batch_size={args.batch_size}", "train.device=cpu", *args.overrides])
    images_root, store = resolve_data(config, None, quiet=True)
    batch = first_batch(bench_dataset(config, images_root, store), config.train.batch_size)
    device = resolve_device(config.train.device)
    context = DistributedContext(device=device)
    method = build_model(config, context)
    method.train()
    optimizer = build_optimizer(config.optim, method.parameter_groups(config.optim.weight_decay), lr=0.01)
    runner = StepRunner(method, method, optimizer, context, config.train.precision, 1, config.train.channels_last)
    runner.run([batch], 0, 100, lr=0.01)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as profiler:
        for step in range(1, args.steps + 1):
            runner.run([batch], step, 100, lr=0.01)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(f"precision {runner.precision}, batch {args.batch_size}, {args.steps} steps")
    print(table)
    if args.output:
        Path(args.output).write_text(table)


if __name__ == "__main__":
    main()
