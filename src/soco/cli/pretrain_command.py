"""`soco pretrain`: resolve data, proposals and configuration, then run the training engine."""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

from soco.config.loading import load_config, with_flags
from soco.config.schema import Config
from soco.config.validation import count_argument, positive_number_argument
from soco.data.images import list_images
from soco.data.photos import assemble_photos, default_cache_dir
from soco.data.proposals.pipeline import run_proposals
from soco.data.proposals.store import is_store, listing_digest

DEFAULT_PRESET = "soco_small"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco pretrain`."""
    parser.add_argument("--config", default=None,
                        help=f"preset name or YAML file (default: {DEFAULT_PRESET}, or the --method's small preset)")
    parser.add_argument("--method", default=None, help="pretraining method (sets method.name; see `soco methods`)")
    parser.add_argument("--data", default=None, help="image folder (default: the built-in photos)")
    parser.add_argument("--proposals", default=None, metavar="STORE",
                        help="proposal store of the --data images, made by `soco proposals` (default: computed once "
                             "and cached; only methods that read proposals use it)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_number_argument, default=None, metavar="N",
                        help="train for N passes over the images (sets train.epochs, and train.steps=0); "
                             "default: the preset's length")
    length.add_argument("--steps", type=count_argument(1, "; to train by epochs use --epochs"), default=None,
                        metavar="N", help="train for exactly N optimiser steps, N >= 1 (sets train.steps; in a "
                                          "config, train.steps=0 means: train for train.epochs)")
    parser.add_argument("--batch-size", type=count_argument(1), default=None, help="images per process and step")
    parser.add_argument("--workers", type=count_argument(0), default=None,
                        help="data-loader workers per process; 0: load in the main process "
                             "(default: train.workers, -1: chosen from the cores)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="where to train: auto (CUDA when available; the default), cpu or cuda (sets train.device)")
    parser.add_argument("--seed", type=count_argument(0), default=None,
                        help="seed of the weights, the data order and the views (sets train.seed; default 0)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=32")


def preset_for(args: argparse.Namespace) -> str:
    """The preset to start from: --config, else the --method's own small preset, else the default."""
    if args.config:
        return args.config
    if getattr(args, "method", None):
        from soco.registry import method_class

        return method_class(args.method).default_preset
    return DEFAULT_PRESET


def resolve_config(args: argparse.Namespace) -> Config:
    """The preset, then key=value overrides, then the dedicated flags; every value checked, nothing written yet."""
    flags = [
        ("--method", "method.name", args.method), ("--epochs", "train.epochs", args.epochs),
        ("--epochs", "train.steps", 0 if args.epochs is not None else None), ("--steps", "train.steps", args.steps),
        ("--batch-size", "train.batch_size", args.batch_size), ("--workers", "train.workers", args.workers),
        ("--device", "train.device", args.device), ("--seed", "train.seed", args.seed), ("--data", "data.images", args.data),
    ]
    return load_config(preset_for(args), with_flags(args.overrides, flags))


def default_store_for(images_root: Path, config: Config) -> Path:
    """Cache folder of the proposals of an image folder, keyed by its listing, the algorithm with its
    parameters and the filter: a changed algorithm (e.g. a new default) gets a new store, never an old one."""
    from soco.data.proposals.selective_search import get_algorithm

    # an unreadable subfolder is left out here as `soco proposals` records and leaves it out
    digest = listing_digest(list_images(images_root, unreadable={}))[:12]
    proposals = config.proposals
    settings = (get_algorithm(proposals.algorithm).fingerprint, proposals.min_side, proposals.max_aspect,
                proposals.min_relative_scale, proposals.max_relative_scale)
    settings_digest = hashlib.blake2b(repr(settings).encode(), digest_size=4).hexdigest()
    cache = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    return cache / "proposals" / f"{images_root.name}-{digest}-{proposals.algorithm}-{settings_digest}"


def ensure_proposals(images_root: Path, store: Path, config: Config, quiet: bool) -> None:
    """Compute the proposal store if missing; under torchrun only rank 0 computes, the others wait."""
    if is_store(store):
        return
    if int(os.environ.get("RANK", "0")) != 0:
        while not is_store(store):
            time.sleep(2.0)
        return
    print(f"computing proposals for {images_root} into {store} (once; later runs reuse them)")
    summary = run_proposals(images_root, store, config.proposals, progress=not quiet)
    for line in summary.lines():
        print(line)


def resolve_data(config: Config, proposals: str | None, quiet: bool) -> tuple[Path, Path | None]:
    """The image folder (default: the built-in photos) and its proposal store (computed if the method uses one)."""
    if config.data.images:
        images_root = Path(config.data.images).expanduser()
    else:
        cache = Path(config.data.cache_dir) / "photos" if config.data.cache_dir else None
        images_root = assemble_photos(cache, progress=not quiet)
    from soco.registry import method_class

    if not method_class(config.method.name).uses_proposals(config.method):
        return images_root, (Path(proposals) if proposals else None)
    store = Path(proposals) if proposals else default_store_for(images_root, config)
    if not proposals:
        ensure_proposals(images_root, store, config, quiet)
    return images_root, store


def run(args: argparse.Namespace) -> int:
    """Run `soco pretrain`."""
    config = resolve_config(args)  # first: a bad value is reported before torch is even imported
    from soco.engine.trainer import RUN_KIND, pretrain
    from soco.run_folder import check_run_folder

    preset_name = Path(preset_for(args)).stem
    run_dir = Path(args.out) if args.out else Path("runs") / preset_name
    check_run_folder(run_dir, RUN_KIND)  # before proposals are computed: a wrong --out costs nothing
    images_root, store = resolve_data(config, args.proposals, args.quiet)
    from soco.engine.distributed import shutdown_distributed

    try:
        summary = pretrain(config, run_dir, images_root, store, resume=args.resume, progress=not args.quiet)
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        for line in summary.lines():
            print(line)
    return 0
