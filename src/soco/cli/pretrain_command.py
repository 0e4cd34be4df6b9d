"""`soco pretrain`: resolve data, proposals and configuration, then run the training engine."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from soco.config.loading import load_config
from soco.config.schema import Config
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
    parser.add_argument("--proposals", default=None, help="proposal store (default: computed and cached)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None)
    length.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="images per process and step")
    parser.add_argument("--workers", type=int, default=None, help="data-loader workers per process")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=None)
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


def method_overrides(args: argparse.Namespace) -> list[str]:
    """`method.name=NAME` for --method (first, so that later overrides of the section apply to it)."""
    return [f"method.name={args.method}"] if getattr(args, "method", None) else []


def resolve_config(args: argparse.Namespace) -> Config:
    """The preset, then key=value overrides, then the dedicated flags."""
    overrides = method_overrides(args) + list(args.overrides)
    flags = {
        "train.epochs": args.epochs, "train.steps": args.steps, "train.batch_size": args.batch_size,
        "train.workers": args.workers, "train.device": args.device, "train.seed": args.seed,
        "data.images": args.data,
    }
    if args.epochs is not None:
        overrides.append("train.steps=0")
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(preset_for(args), overrides)


def default_store_for(images_root: Path, config: Config) -> Path:
    """Cache folder of the proposals of an image folder, keyed by its listing and the algorithm."""
    digest = listing_digest(list_images(images_root))[:12]
    cache = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    return cache / "proposals" / f"{images_root.name}-{digest}-{config.proposals.algorithm}"


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
    from soco.engine.trainer import pretrain

    config = resolve_config(args)
    images_root, store = resolve_data(config, args.proposals, args.quiet)
    preset_name = Path(preset_for(args)).stem
    run_dir = Path(args.out) if args.out else Path("runs") / preset_name
    from soco.engine.distributed import shutdown_distributed

    try:
        summary = pretrain(config, run_dir, images_root, store, resume=args.resume, progress=not args.quiet)
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        for line in summary.lines():
            print(line)
    return 0
