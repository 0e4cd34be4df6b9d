"""Small synthetic image folders for the proposal pipeline tests."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def synthetic_scene(seed: int, width: int = 160, height: int = 120) -> Image.Image:
    """A noisy background with three flat rectangles: objects selective search should find."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)
    for _ in range(3):
        w, h = rng.integers(width // 4, width // 2), rng.integers(height // 4, height // 2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        pixels[y : y + h, x : x + w] = rng.integers(0, 255, size=3)
    return Image.fromarray(pixels)


def make_image_folder(root: Path, count: int, size=(160, 120)) -> Path:
    """`count` synthetic images in a small nested tree, PNG and JPEG."""
    for number in range(count):
        folder = root / f"group{number % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "png" if number % 2 else "jpg"
        synthetic_scene(number, *size).save(folder / f"scene_{number:03d}.{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images", 8)
