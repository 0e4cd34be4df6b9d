"""`soco data ...`: assemble the built-in data sets, or convert a Pascal VOC folder to COCO files."""

from __future__ import annotations

import argparse
from pathlib import Path

from soco.config.validation import MAX_IMAGE_SIDE, count_argument, names_argument, seed_argument


def add_voc_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco data voc`."""
    parser.add_argument("folder", metavar="DIR", help="VOC folder: Annotations/*.xml, JPEGImages/, "
                                                      "optional ImageSets/Main/<split>.txt")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="folder for <split>.json (all.json without split files)")
    parser.add_argument("--classes", type=names_argument, default=None, metavar="A,B,...",
                        help="category order (ids 1..C); every object's class must be listed (default: sorted names)")


def run_voc(args: argparse.Namespace) -> int:
    """Run `soco data voc`."""
    from soco.labelled.voc import IMAGES_DIR, convert_voc

    result = convert_voc(args.folder, args.output, classes=args.classes)
    for line in result.lines():
        print(line)
    images = Path(args.folder).expanduser() / IMAGES_DIR
    if {"train", "val"} <= set(result.files):
        print(f"fine-tune: soco transfer --weights none --train {result.files['train']} --train-images {images} "
              f"--val {result.files['val']} --val-images {images}")
    return 0


def add_composed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco data composed`."""
    parser.add_argument("-o", "--output", default=None, metavar="OUT",
                        help="folder for train.json, val.json and images/ (default: the cache folder)")
    parser.add_argument("--train-images", type=count_argument(1), default=300, help="training scenes (default 300)")
    parser.add_argument("--val-images", type=count_argument(1), default=150, help="validation scenes (default 150)")
    # the smallest scene (32 px) is the scene builder's own check, told before anything is fetched
    parser.add_argument("--size", type=count_argument(1, maximum=MAX_IMAGE_SIDE), default=256,
                        help=f"side of the square scenes in pixels, 32 to {MAX_IMAGE_SIDE} (default 256)")
    parser.add_argument("--seed", type=seed_argument, default=0, help="scene layout (default 0)")
    parser.add_argument("--stamps", default=None, metavar="DIR",
                        help="the 'stamps' folder of tuxpaint-stamps-default (default: the installed package, "
                             "else the .deb fetched with apt-get download and unpacked into the cache)")
    parser.add_argument("--backgrounds", default=None, metavar="DIR",
                        help="folder of background photos (default: the default photos)")
    parser.add_argument("--quiet", action="store_true", help="print only the folder")


def run_composed(args: argparse.Namespace) -> int:
    """Run `soco data composed`."""
    from soco.labelled.composed import prepare_composed

    dest = prepare_composed(args.output, train_images=args.train_images, val_images=args.val_images,
                            size=args.size, seed=args.seed, stamps=args.stamps, backgrounds=args.backgrounds,
                            quiet=args.quiet)
    if args.quiet:
        print(dest)
        return 0
    print(f"composed scenes (7 classes, exact boxes and masks; the scenes are composed): {dest}")
    print(f"fine-tune: soco transfer --weights none --train {dest / 'train.json'} --val {dest / 'val.json'}")
    print(f"probe:     soco probe --weights FILE --labels {dest / 'val.json'} --stage c4 --no-background")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch `soco data DATASET`."""
    if args.data_set == "voc":
        return run_voc(args)
    if args.data_set == "composed":
        return run_composed(args)
    if args.data_set == "photos":
        from soco.data.default_photos import assemble_photos, photos_dir

        dest = Path(args.dest) if args.dest else photos_dir()
        folder = assemble_photos(dest, progress=not args.print_path)
        if args.print_path:
            print(folder)
        else:
            count = sum(1 for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
            print(f"default photos: {count} images in {folder}")
        return 0
    raise AssertionError(args.data_set)
