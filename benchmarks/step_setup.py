"""What the step benchmarks share: their command line, and the trainer's own step on `soco bench`'s batch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from soco.cli.pretrain_command import resolve_data
from soco.config.loading import load_config
from soco.config.schema import Config
from soco.engine.bench import bench_dataset, first_batch
from soco.engine.distributed import DistributedContext, resolve_device
from soco.engine.optimizers import build_optimizer
from soco.engine.step import StepRunner, resolve_precision, smallest_view_side
from soco.engine.trainer import build_model


def step_parser(description: str) -> argparse.ArgumentParser:
    """--config, --batch-size and key=value overrides; a script adds its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="soco_r50_fpn")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    return parser


@dataclass
class Step:
    """A configuration's step, ready to run on one batch (as `soco bench` times it)."""

    config: Config
    runner: StepRunner
    batch: dict
    precision: str  # what train.precision resolved to for this batch

    def run(self, step: int, total_steps: int = 1000) -> None:
        """One training step on the batch."""
        self.runner.run([self.batch], step, total_steps, lr=0.01)


def build_step(args: argparse.Namespace) -> Step:
    """The configuration of `args` on the CPU: its data's first batch, model, optimiser and StepRunner."""
    config = load_config(args.config, [f"train.batch_size={args.batch_size}", "train.device=cpu", *args.overrides])
    images_root, store = resolve_data(config, None, quiet=True)
    batch = first_batch(bench_dataset(config, images_root, store), config.train.batch_size)
    device = resolve_device(config.train.device)
    context = DistributedContext(device=device)
    method = build_model(config, context)
    method.train()
    optimizer = build_optimizer(config.optim, method.parameter_groups(config.optim.weight_decay), lr=0.01)
    runner = StepRunner(method, method, optimizer, context, config.train.precision, config.train.channels_last)
    precision = resolve_precision(config.train.precision, device, smallest_view_side(batch))
    return Step(config, runner, batch, precision)

