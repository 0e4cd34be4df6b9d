"""DetCo's views: the nine patches come from the nine cells of the grid (pixels), shuffling is a switch."""

import numpy as np
import pytest
import torch

from soco.config.validation import validate_section
from soco.data.views import denormalize
from soco.errors import ConfigError
from soco.methods.detco_transform import DetCoTransform, DetCoViewsConfig

CELL_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
                (128, 0, 0), (0, 128, 0), (0, 0, 128)]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid_image(side: int = 90) -> np.ndarray:
    """A square image of 3x3 flat blocks, one colour per cell, row-major."""
    image = np.zeros((side, side, 3), dtype=np.uint8)
    cell = side // 3
    for number, colour in enumerate(CELL_COLOURS):
        row, column = divmod(number, 3)
        image[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell] = colour
    return image


def patch_colour(patch: torch.Tensor) -> tuple[int, int, int] | None:
    """The patch's one colour in 0-255, or None when it is not flat."""
    pixels = (denormalize(patch) * 255).round()
    flat = pixels.reshape(3, -1)
    if (flat.max(dim=1).values - flat.min(dim=1).values).max() > 1:
        return None
    return tuple(int(v) for v in flat[:, 0])


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_nine_patches_come_from_the_nine_cells(shuffle):
    # the local crop is the whole (square) image, so each cell of the grid is one block of the picture
    config = DetCoViewsConfig(global_size=32, local_size=90, patch_size=20, local_scale=[1.0, 1.0],
                              crop_ratio=[1.0, 1.0], color_augment=False, shuffle_patches=shuffle)
    transform = DetCoTransform(config)
    orders = set()
    for seed in range(10):
        patches, corners = transform.patch_set(torch.from_numpy(grid_image()).permute(2, 0, 1), generator(seed))
        assert patches.shape == (9, 3, 20, 20)
        colours = [patch_colour(patch) for patch in patches]
        assert all(colour is not None for colour in colours)  # never across a cell border
        for colour, (top, left) in zip(colours, corners):
            cell = (top // 30) * 3 + left // 30
            assert colour == CELL_COLOURS[cell]
            assert top % 30 + 20 <= 30 and left % 30 + 20 <= 30  # inside its cell
        orders.add(tuple(CELL_COLOURS.index(c) for c in colours))
    if shuffle:
        assert len(orders) > 1 and all(sorted(order) == list(range(9)) for order in orders)
    else:
        assert orders == {tuple(range(9))}


def test_sample_holds_two_global_views_and_two_patch_sets():
    config = DetCoViewsConfig(global_size=40, local_size=48, patch_size=12)
    sample = DetCoTransform(config)(grid_image(), np.zeros((0, 4), np.float32), generator(0))
    assert sample["global_q"].shape == sample["global_k"].shape == (3, 40, 40)
    assert sample["local_q"].shape == sample["local_k"].shape == (9, 3, 12, 12)
    assert not torch.equal(sample["global_q"], sample["global_k"])
    batch = DetCoTransform(config).collate([sample, sample])
    assert batch["local_k"].shape == (2, 9, 3, 12, 12)


def test_a_patch_larger_than_its_cell_is_refused():
    with pytest.raises(ConfigError, match="patch_size"):
        validate_section(DetCoViewsConfig(local_size=96, patch_size=33), "method.views")
