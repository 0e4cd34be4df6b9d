"""`soco pretrain`: resolve data, proposals and configuration, then run the training engine."""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

from soco.cli.probe_command import STAGE_CHOICES
from soco.config.loading import load_config, with_flags
from soco.config.schema import Config
from soco.config.validation import count_argument, positive_number_argument, seed_argument
from soco.data.image_files import list_images
from soco.data.default_photos import assemble_photos, default_cache_dir
from soco.data.proposals.pipeline import refuse_other_algorithm, run_proposals
from soco.data.proposals.store import is_store, listing_digest
from soco.errors import ConfigError, DataError

DEFAULT_PRESET = "soco_small"
DEFAULT_PROBE_MAX_IMAGES = 200  # as `soco probe`


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
    parser.add_argument("--seed", type=seed_argument, default=None,
                        help="seed of the weights, the data order and the views (sets train.seed; default 0)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    probe = parser.add_argument_group("box probe during pretraining (the `soco probe` health check)")
    probe.add_argument("--probe-labels", default=None, metavar="COCO.json",
                       help="COCO file of labelled boxes: k-NN and linear-probe accuracy of the online encoder's box "
                            "features every --probe-every steps, against the run's random init, in train.log, "
                            "metrics.jsonl and TensorBoard (probe/*)")
    probe.add_argument("--probe-images", default=None, metavar="DIR",
                       help="folder the file_names are relative to (default: 'images' next to --probe-labels)")
    probe.add_argument("--probe-every", type=count_argument(0), default=None, metavar="N",
                       help="probe every N steps and after the last; 0: never (default: train.checkpoint_every)")
    probe.add_argument("--probe-max-images", type=count_argument(2), default=DEFAULT_PROBE_MAX_IMAGES, metavar="N",
                       help=f"images with boxes probed (default {DEFAULT_PROBE_MAX_IMAGES})")
    probe.add_argument("--probe-stage", default=None, choices=STAGE_CHOICES,
                       help="ResNet stage pooled (default: the encoder's last: c5, or c4 for a C4 model)")
    probe.add_argument("--probe-no-background", action="store_true",
                       help="only the labelled classes (default: add one background box per object, as `soco probe`)")
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
    elif is_store(store):  # the trainer says in one line what is wrong with a path that is not a store
        refuse_other_algorithm(store, config.proposals)
    return images_root, store


def probe_paths(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """(labels file, image folder) of the probe, checked to exist; None without --probe-labels. Imports no torch."""
    if args.probe_labels is None:
        options = (("--probe-images", args.probe_images), ("--probe-every", args.probe_every),
                   ("--probe-stage", args.probe_stage), ("--probe-no-background", args.probe_no_background or None))
        given = [option for option, value in options if value is not None]
        if args.probe_max_images != DEFAULT_PROBE_MAX_IMAGES:
            given.append("--probe-max-images")
        if given:
            raise ConfigError(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} --probe-labels, "
                              "the COCO file of the boxes to probe")
        return None
    labels = Path(args.probe_labels).expanduser()
    if not labels.is_file():
        state = "is not a file" if labels.exists() else "does not exist"
        raise DataError(f"--probe-labels: annotation file {labels} {state}")
    images = Path(args.probe_images).expanduser() if args.probe_images else labels.parent / "images"
    if not images.is_dir():
        hint = "" if args.probe_images else " (the default, next to the labels; pass --probe-images)"
        raise DataError(f"--probe-images: image folder {images} does not exist{hint}")
    return labels, images


class ProbeHook:
    """A step hook (`soco.engine.hooks.StepHook`): the box probe of the online encoder every `every` steps.

    Each probe scores the encoder's ResNet on the same crops as the random-init floor, which is measured
    once, before training, on the run's own step-0 weights (the method built from `train.seed`, as the
    trainer builds it), so that every record carries its floor. The probe reads no global random state
    and leaves every module in its mode (`soco.transfer.probe`), so training is the same with or without it.
    """

    def __init__(self, dataset, every: int, stage: str, max_images: int, seed: int, floor, background: bool = True):
        self.dataset, self.every, self.stage = dataset, every, stage
        self.max_images, self.seed, self.floor, self.background = max_images, seed, floor, background

    def start(self, step: int, method, log) -> None:
        """The floor, once per session, in train.log."""
        floor = self.floor
        log.text(f"probe every {self.every} steps (and after the last) on {self.dataset.annotation_file}: "
                 f"{floor.stage} box features, {floor.train_crops} training and {floor.test_crops} test crops of "
                 f"{floor.train_images + floor.test_images} images; random init (step 0): k-NN "
                 f"{floor.knn_accuracy:.1%}, linear {floor.linear_accuracy:.1%}; majority class "
                 f"{floor.majority_accuracy:.1%}")

    def after_step(self, step: int, method, log) -> None:
        """Probe the online encoder; its scores and the floor to metrics.jsonl and TensorBoard, a line to train.log."""
        from soco.transfer.probe import probe_backbone

        result = probe_backbone(method.encoder(), self.dataset, stage=self.stage, max_images=self.max_images,
                                seed=self.seed, background=self.background)
        log.scalars(step, {
            "probe/knn": result.knn_accuracy, "probe/linear": result.linear_accuracy,
            "probe/knn_random": self.floor.knn_accuracy, "probe/linear_random": self.floor.linear_accuracy,
            "probe/majority": result.majority_accuracy,
        })
        log.text(f"probe at step {step}: k-NN {result.knn_accuracy:.1%} (random init {self.floor.knn_accuracy:.1%}), "
                 f"linear {result.linear_accuracy:.1%} (random init {self.floor.linear_accuracy:.1%}); "
                 f"majority class {result.majority_accuracy:.1%}")


def build_probe_hook(args: argparse.Namespace, config: Config, paths: tuple[Path, Path]) -> ProbeHook | None:
    """The probe of `soco pretrain --probe-labels`, its floor measured now (errors before any folder is made); None when
    --probe-every is 0."""
    every = config.train.checkpoint_every if args.probe_every is None else args.probe_every
    if every == 0:
        return None
    import torch

    from soco.engine.distributed import resolve_device
    from soco.registry import build_method
    from soco.labelled.coco import CocoDetection
    from soco.transfer.probe import STAGES, probe_backbone, resnet_trunk

    labels, images = paths
    dataset = CocoDetection(labels, images)
    # The run's own initial weights: the trainer seeds with train.seed and builds the method first. Forked, so
    # that building this copy draws nothing from the random state of whoever calls.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        trunk = resnet_trunk(build_method(config.method).encoder())
    stages = [name for name, (layer, _) in STAGES.items() if hasattr(trunk, layer)]
    stage = args.probe_stage or stages[-1]
    if stage not in stages:
        raise ConfigError(f"--probe-stage {stage}: the {config.method.name} encoder's ResNet ends at {stages[-1]}")
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # where this process will train
    background = not args.probe_no_background
    floor = probe_backbone(trunk.to(device), dataset, stage=stage, max_images=args.probe_max_images,
                           seed=config.train.seed, progress=not args.quiet, background=background)
    return ProbeHook(dataset, every, stage, args.probe_max_images, config.train.seed, floor, background)


def run(args: argparse.Namespace) -> int:
    """Run `soco pretrain`."""
    config = resolve_config(args)  # first: a bad value is reported before torch is even imported
    probe = probe_paths(args)
    from soco.engine.trainer import RUN_KIND, pretrain
    from soco.run_folder import check_run_folder

    preset_name = Path(preset_for(args)).stem
    run_dir = Path(args.out) if args.out else Path("runs") / preset_name
    check_run_folder(run_dir, RUN_KIND)  # before proposals are computed: a wrong --out costs nothing
    main_process = int(os.environ.get("RANK", "0")) == 0
    # Only the main process probes; the floor is measured before proposals are computed or any folder is made.
    hook = build_probe_hook(args, config, probe) if probe is not None and main_process else None
    images_root, store = resolve_data(config, args.proposals, args.quiet)
    from soco.engine.distributed import shutdown_distributed

    try:
        summary = pretrain(config, run_dir, images_root, store, resume=args.resume, progress=not args.quiet,
                           hooks=[hook] if hook is not None else [])
    finally:
        shutdown_distributed()
    if main_process:
        for line in summary.lines():
            print(line)
    return 0
