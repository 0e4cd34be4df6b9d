"""`soco bench`: measure training-step and data-loading throughput on this machine, as JSON."""

from __future__ import annotations

import argparse
import json

from soco.cli.pretrain_command import preset_for, resolve_data
from soco.config.loading import load_config, with_flags
from soco.config.validation import count_argument
from soco.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco bench`."""
    parser.add_argument("--config", default=None, help="preset name or YAML file (default: soco_small, or the "
                        "--method's small preset)")
    parser.add_argument("--method", default=None, help="method to time (sets method.name)")
    parser.add_argument("--data", default=None, help="image folder (default: the built-in photos)")
    parser.add_argument("--proposals", default=None, metavar="STORE",
                        help="proposal store of the --data images, made by `soco proposals` (default: computed once "
                             "and cached)")
    parser.add_argument("--steps", type=count_argument(1), default=5, metavar="N",
                        help="timed training steps, N >= 1 (default 5; not train.steps)")
    parser.add_argument("--warmup", type=count_argument(0), default=2, help="untimed steps first (default 2)")
    parser.add_argument("--data-batches", type=count_argument(1), default=10,
                        help="timed data-loader batches (default 10)")
    parser.add_argument("--batch-size", type=count_argument(1), default=None,
                        help="images per step (sets train.batch_size)")
    parser.add_argument("--workers", type=count_argument(0), default=None,
                        help="data-loader workers to time (sets train.workers)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="where to time: auto (CUDA when available; the default), cpu or cuda (sets train.device)")
    compare = parser.add_mutually_exclusive_group()
    compare.add_argument("--compare", default=None, metavar="KEY=VALUE",
                        help="also time the step with this override and report the speed-up, "
                             "e.g. method.model.pool_all_levels=false")
    compare.add_argument("--compare-pooling", action="store_true",
                        help="SoCo: also time the other pooling (each box on its own level against the release's "
                             "all-level pooling), the opposite of the configured method.model.pool_all_levels")
    parser.add_argument("-o", "--output", default=None, help="also write the JSON to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print JSON."""
    overrides = with_flags(args.overrides, [
        ("--method", "method.name", args.method), ("--batch-size", "train.batch_size", args.batch_size),
        ("--workers", "train.workers", args.workers), ("--device", "train.device", args.device),
        ("--data", "data.images", args.data),
    ])
    preset = preset_for(args)
    config = load_config(preset, overrides)
    change = args.compare
    if args.compare_pooling:
        pooling = getattr(getattr(config.method, "model", None), "pool_all_levels", None)
        if pooling is None:
            raise ConfigError(f"--compare-pooling: applies to SoCo, not method {config.method.name!r}")
        change = f"method.model.pool_all_levels={str(not pooling).lower()}"
    compare = (change, load_config(preset, [*overrides, change])) if change else None
    # imported once the configuration is checked: it imports torch
    from soco.engine.bench import run_bench

    images_root, store = resolve_data(config, args.proposals, quiet=True)
    result = run_bench(config, images_root, store, args.steps, args.warmup, args.data_batches, compare)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    return 0
