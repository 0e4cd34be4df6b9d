"""`soco probe`: k-NN and linear-probe accuracy of pretrained weights on labelled boxes, against a random init."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from soco.config.validation import Range, config_argument, count_argument, number_argument, seed_argument

DEFAULT_PROBE_OUT = Path("runs") / "probe"
RESULTS_NAME = "probe.json"
STAGE_CHOICES = ("c2", "c3", "c4", "c5")  # soco.transfer.probe.STAGES, without importing torch here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco probe`."""
    parser.add_argument("--weights", required=True, metavar="FILE|none",
                        help="`soco export --to torchvision` or `--to backbone` file; 'none': the random floor only")
    parser.add_argument("--labels", required=True, metavar="COCO.json", help="COCO annotations of the boxes to probe")
    parser.add_argument("--data", default=None, metavar="IMAGES",
                        help="folder the file_names are relative to (default: 'images' next to --labels)")
    parser.add_argument("--test-labels", default=None, metavar="COCO.json",
                        help="test on this file's boxes and train on all of --labels' (default: split --labels' "
                             "images); e.g. val.json against train.json, whose objects it never shows")
    parser.add_argument("--test-data", default=None, metavar="IMAGES",
                        help="folder of --test-labels' images (default: 'images' next to --test-labels)")
    parser.add_argument("--out", default=None, help=f"folder for {RESULTS_NAME} (default: {DEFAULT_PROBE_OUT})")
    parser.add_argument("--depth", type=config_argument("soco.transfer.finetune:TransferConfig", "depth"), default=None,
                        help="ResNet depth (default: read from the file, else 50)")
    parser.add_argument("--stage", default="c5", choices=STAGE_CHOICES, help="ResNet stage pooled (default c5)")
    parser.add_argument("--k", type=count_argument(1), default=20, help="neighbours of the k-NN vote (default 20)")
    parser.add_argument("--steps", type=count_argument(1), default=300, help="linear-probe training steps (default 300)")
    parser.add_argument("--max-images", type=count_argument(1), default=200,
                        help="images with boxes probed, per file with --test-labels (default 200)")
    # 0 or 1 would leave the training or the test split empty
    parser.add_argument("--test-fraction", type=number_argument(Range(0.0, 1.0, low_open=True, high_open=True)),
                        default=0.5,
                        help="share of images held out, without --test-labels (default 0.5)")
    parser.add_argument("--no-background", action="store_true",
                        help="only the labelled classes (default: add one background box per object)")
    parser.add_argument("--seed", type=seed_argument, default=0,
                        help="image order, split and background boxes (default 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run `soco probe`."""
    import torch

    from soco.engine.step import resolve_precision
    from soco.errors import ConfigError, SocoError
    from soco.files import atomic_write_text
    from soco.labelled.coco import CocoDetection, check_same_categories
    from soco.transfer.probe import PROBE_PRECISION, format_table, pretrained_trunk, probe_backbones
    from soco.transfer.weights import check_depth, read_weights, resnet_depth

    if args.test_data and not args.test_labels:
        raise ConfigError("--test-data needs --test-labels, the COCO file of the test boxes")
    weights = None if args.weights.strip().lower() == "none" else Path(args.weights).expanduser()
    if weights is not None and not weights.is_file():
        raise SocoError(f"weights file {weights} does not exist (or pass --weights none)")
    state = read_weights(weights) if weights is not None else None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    depth = args.depth or (resnet_depth(state) if state is not None else None) or 50
    if state is not None:
        check_depth(state, depth, weights)
    images = Path(args.data).expanduser() if args.data else Path(args.labels).expanduser().parent / "images"
    dataset = CocoDetection(args.labels, images)
    test_dataset, test_images = None, None
    if args.test_labels:
        test_images = (Path(args.test_data).expanduser() if args.test_data
                       else Path(args.test_labels).expanduser().parent / "images")
        # The training file's category list numbers both, so a class means the same in each.
        test_dataset = CocoDetection(args.test_labels, test_images, categories=dataset.category_ids)
        check_same_categories(dataset, test_dataset)
    backbones, loaded = {}, None
    if weights is not None:
        backbones[f"pretrained ({weights.name})"], loaded = pretrained_trunk(depth, args.seed, state, weights)
        print(loaded.line())
    backbones["random init"], _ = pretrained_trunk(depth, args.seed)
    for backbone in backbones.values():
        backbone.to(device)
    results = probe_backbones(
        backbones, dataset, stage=args.stage, k=args.k, linear_steps=args.steps, background=not args.no_background,
        test_fraction=args.test_fraction, max_images=args.max_images, seed=args.seed, progress=not args.quiet,
        test_dataset=test_dataset,
    )
    tested_on = f" (test: {test_dataset.annotation_file})" if test_dataset is not None else ""
    print(format_table(results, title=f"probe of ResNet-{depth} on {dataset.annotation_file}{tested_on}"))
    out = Path(args.out) if args.out else DEFAULT_PROBE_OUT
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "labels": str(dataset.annotation_file), "images": str(images),
        "test_labels": str(test_dataset.annotation_file) if test_dataset is not None else None,
        "test_images": str(test_images) if test_images is not None else None,
        "weights": str(weights) if weights else None,
        "depth": depth, "device": str(device), "precision": resolve_precision(PROBE_PRECISION, device),
        "seed": args.seed, "background": not args.no_background,
        "max_images": args.max_images,
        "test_fraction": None if test_dataset is not None else args.test_fraction, "linear_steps": args.steps,
        "loaded": loaded.loaded if loaded else None,
        "results": {name: result.as_dict() for name, result in results.items()},
    }
    atomic_write_text(out / RESULTS_NAME, json.dumps(record, indent=2))
    print(f"results: {out / RESULTS_NAME}")
    return 0
