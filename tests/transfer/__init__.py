"""Tests of soco.transfer, and a synthetic COCO set they share: coloured rectangles drawn on noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_coco_set(folder: Path, count: int = 6, size: tuple[int, int] = (96, 80), seed: int = 0,
                  objects: int = 2, prefix: str = "img", masks: bool = False) -> tuple[Path, Path]:
    """(annotation file, images folder) of `count` noise images with `objects` filled rectangles each.

    With `masks`, every annotation also carries its rectangle as a polygon 'segmentation'.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        pixels = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
        for _ in range(objects):
            w, h = int(rng.integers(16, 32)), int(rng.integers(16, 32))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            pixels[y:y + h, x:x + w] = rng.integers(150, 256, 3, dtype=np.uint8)
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                          "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            if masks:
                annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            annotations.append(annotation)
        name = f"{prefix}{image_id:03d}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
    annotation_file = folder / "annotations.json"
    annotation_file.write_text(json.dumps(data))
    return annotation_file, images_dir
