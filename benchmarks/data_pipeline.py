"""Images/s per core of a method's data pipeline (decode + the method's views) on ImageNet-like JPEGs.

    .venv/bin/python benchmarks/data_pipeline.py [--config soco_r50_fpn] [--passes 2] [--profile] [key=value ...]

The JPEGs are the default photos re-encoded at 500x375 (ImageNet's typical size), quality 90, made once
under outputs/imagenet_like/. One process on one torch thread: the rate is per core. SoCo samples its
K boxes at random (`method.views.box_source=random`): the same views and the same work per box as
with proposals, without computing a proposal store first.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import cv2
import torch
from PIL import Image

from soco.config.loading import load_config
from soco.data import views
from soco.data.dataset import ImageDataset
from soco.data.image_files import list_images, load_rgb
from soco.data.default_photos import photos_dir
from soco.registry import build_method

JPEG_FOLDER = Path("outputs/imagenet_like")
JPEG_SIZE = (500, 375)


def make_jpegs(source: Path, folder: Path = JPEG_FOLDER) -> Path:
    """The default photos re-encoded as 500x375 quality-90 JPEGs (made once)."""
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for number, relative in enumerate(list_images(source)):
        rgb = load_rgb(source / relative)
        size = JPEG_SIZE if rgb.shape[1] >= rgb.shape[0] else JPEG_SIZE[::-1]
        Image.fromarray(rgb).resize(size, Image.BICUBIC).save(folder / f"{number:04d}.jpg", quality=90)
    return folder


def main() -> None:
    """Time the data set's __getitem__ over every JPEG, `passes` times, on one thread."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="soco_r50_fpn")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print the 25 heaviest functions")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--color-backend", default="opencv", choices=["opencv", "torchvision"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    views.COLOR_BACKEND = args.color_backend
    overrides = list(args.overrides)
    config = load_config(args.config, overrides)
    if config.method.name == "soco" and config.method.views.box_source == "proposals":
        config = load_config(args.config, [*overrides, "method.views.box_source=random"])
    folder = make_jpegs(photos_dir())
    dataset = ImageDataset(folder, None, build_method(config.method).sample_transform(), seed=0)
    dataset[0]  # imports and first-call set-up are not throughput
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    for epoch in range(args.passes):
        for position in range(len(dataset)):
            dataset[(epoch, position)]
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    images = args.passes * len(dataset)
    result = {"config": args.config, "overrides": overrides, "color_backend": args.color_backend, "images": images, "seconds": round(seconds, 3),
              "images_per_second_per_core": round(images / seconds, 2)}
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
