"""`soco transfer` (fine-tune a detector and measure COCO AP) and `soco data deepforest` (the labeled tree set)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from soco.config.validation import FRACTION, MAX_IMAGE_SIDE, config_argument, count_argument, number_argument
from soco.transfer.architectures import ARCHITECTURES

DEFAULT_TRANSFER_OUT = Path("runs") / "transfer"
TRANSFER_CONFIG = "soco.transfer.finetune:TransferConfig"  # the flags' keys, checked by its rules


def transfer_key(key: str, whole: bool = True):
    """The argparse type of a flag that sets TransferConfig's `key`: that key's rule, read when it is used."""
    return config_argument(TRANSFER_CONFIG, key, whole)


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco transfer`."""
    parser.add_argument("--weights", required=True, metavar="FILE|none",
                        help="torchvision-keyed state dict (soco export --to torchvision, or --to backbone), "
                             "or 'none' for scratch")
    parser.add_argument("--train", required=True, metavar="ANN.json", help="COCO annotations to fine-tune on")
    parser.add_argument("--train-images", default=None, metavar="DIR",
                        help="folder the train file_names are relative to (default: 'images' next to --train)")
    parser.add_argument("--val", required=True, metavar="ANN.json", help="COCO annotations to evaluate on")
    parser.add_argument("--val-images", default=None, metavar="DIR",
                        help="folder the val file_names are relative to (default: 'images' next to --val)")
    parser.add_argument("--model", default=None, choices=["auto", *ARCHITECTURES],
                        help="detector (default auto: mask_rcnn when the training annotations have masks, else "
                             "faster_rcnn; docs/transfer.md)")
    parser.add_argument("--depth", type=transfer_key("depth"), default=None, help="ResNet depth (default 50)")
    parser.add_argument("--epochs", type=transfer_key("epochs"), default=None, help="training epochs (default 24)")
    parser.add_argument("--batch-size", type=transfer_key("batch_size"), default=None,
                        help="images per process and step (default 4)")
    parser.add_argument("--lr", type=transfer_key("lr", whole=False), default=None,
                        help="learning rate (default 0.02 x total batch / 16)")
    parser.add_argument("--min-size", type=transfer_key("min_size"), default=None,
                        help="detector resize, shorter side (default 400)")
    parser.add_argument("--max-size", type=transfer_key("max_size"), default=None,
                        help="detector resize, longer side cap (default 667)")
    parser.add_argument("--workers", type=transfer_key("workers"), default=None,
                        help="data-loader processes (default 0)")
    parser.add_argument("--eval-every", type=transfer_key("eval_every"), default=None,
                        help="also evaluate every N epochs (default: only at the end)")
    parser.add_argument("--seed", type=transfer_key("seed"), default=None, help="random seed (default 0)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default=None, help=f"run folder (default: {DEFAULT_TRANSFER_OUT})")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--stop-after-epochs", type=count_argument(1), default=None, metavar="N",
                        help="end this call after N epochs (continue later with --resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="TransferConfig overrides, e.g. weight_decay=1e-4 steps=[0.5,0.8]")


def resolve_transfer_config(args: argparse.Namespace):
    """Defaults, then key=value overrides, then the dedicated flags."""
    from soco.transfer.finetune import TransferConfig, apply_overrides

    overrides = list(getattr(args, "overrides", None) or [])
    flags = {
        "model": args.model, "depth": args.depth, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "min_size": args.min_size, "max_size": args.max_size, "workers": args.workers,
        "eval_every": args.eval_every, "seed": args.seed, "device": args.device,
    }
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    return apply_overrides(TransferConfig(), overrides)


def _images_dir(given: str | None, annotations: str) -> Path:
    return Path(given) if given else Path(annotations).expanduser().parent / "images"


def run_transfer(args: argparse.Namespace) -> int:
    """Run `soco transfer`."""
    import os

    from soco.engine.distributed import shutdown_distributed
    from soco.transfer.evaluate import summary_line
    from soco.transfer.finetune import METRICS_NAME, finetune
    from soco.transfer.weights import check_weights_path

    config = resolve_transfer_config(args)
    # A missing file, a run folder or a Detectron2 .pkl is told before the data are read.
    weights = None if args.weights.strip().lower() == "none" else check_weights_path(args.weights)
    out = Path(args.out) if args.out else DEFAULT_TRANSFER_OUT
    try:
        metrics = finetune(
            config, args.train, _images_dir(args.train_images, args.train), args.val,
            _images_dir(args.val_images, args.val), out, weights=weights, resume=args.resume,
            progress=not args.quiet, stop_after_epochs=args.stop_after_epochs,
        )
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        if "bbox" in metrics:
            print(f"box AP on {metrics['val']['images']} validation images: {summary_line(metrics['bbox'])}")
        if "segm" in metrics:
            print(f"mask AP: {summary_line(metrics['segm'])}")
        print(f"results: {out / METRICS_NAME}")
    return 0


def add_deepforest_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco data deepforest`."""
    parser.add_argument("-o", "--output", default=None, help="folder to write (default: <cache>/deepforest)")
    parser.add_argument("--tile-size", type=count_argument(16, maximum=MAX_IMAGE_SIDE), default=400,
                        help=f"tile side in pixels, 16 to {MAX_IMAGE_SIDE} (default 400)")
    parser.add_argument("--min-visible", type=number_argument(FRACTION), default=0.5,
                        help="keep a box in a tile when this share of its area is inside (default 0.5)")
    parser.add_argument("--val-width", type=count_argument(1, maximum=MAX_IMAGE_SIDE), default=None,
                        help="columns of each large image given to validation (default: the tile size)")
    parser.add_argument("--print-path", action="store_true", help="only print the folder (building it if needed)")
    parser.add_argument("--quiet", action="store_true", help="no messages but errors")


def run_deepforest(args: argparse.Namespace) -> int:
    """Run `soco data deepforest`."""
    from soco.labelled.deepforest import SPLIT_FILE, prepare_deepforest, training_pixels_folder

    dest = prepare_deepforest(args.output, tile_size=args.tile_size, min_visible=args.min_visible,
                              val_width=args.val_width, quiet=args.quiet or args.print_path)
    if args.print_path:
        print(dest)
        return 0
    if not args.quiet:
        counts = json.loads((dest / SPLIT_FILE).read_text(encoding="utf-8"))["counts"]
        for split in ("train", "val"):
            c = counts[split]
            print(f"{split}: {c['tiles']} tiles, {c['boxes']} boxes ({c['dropped_empty_tiles']} empty tiles dropped)")
        print(f"DeepForest tiles in {dest} (split described in {dest / 'SPLIT.md'})")
        print(f"unlabeled training pixels only: {training_pixels_folder(dest)}")
        print(f"fine-tune: soco transfer --weights none --train {dest / 'train.json'} --val {dest / 'val.json'}")
    return 0
