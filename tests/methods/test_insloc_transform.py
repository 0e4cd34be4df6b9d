"""InsLoc's composites: the box is where the pasted pixels are (also after a flip), sizes, anchors."""

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from soco.config.validation import validate_section
from soco.data.views import denormalize
from soco.errors import ConfigError
from soco.methods.insloc_transform import (
    InsLocTransform,
    InsLocViewsConfig,
    augment_box,
    fitted_size,
    grid_anchors,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Backgrounds:
    """A data set of blue images, for the transform's `source`."""

    def __init__(self):
        self.drawn = 0

    def draw(self, gen):
        self.drawn += 1
        return np.full((70, 90, 3), BLUE, dtype=np.uint8), np.zeros((0, 4), np.float32), 0


def painted(view: torch.Tensor) -> torch.Tensor:
    """(S, S) bool: where a normalised composite is red (the pasted foreground)."""
    pixels = denormalize(view)
    return (pixels[0] > 0.9) & (pixels[2] < 0.1)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_the_box_is_where_the_pasted_pixels_are(flip_prob):
    config = InsLocViewsConfig(canvas_size=96, paste_size=[40, 90], color_augment=False, flip_prob=flip_prob,
                               box_augment=False)
    transform = InsLocTransform(config)
    foreground = np.full((120, 80, 3), RED, dtype=np.uint8)
    foreground[:, :40] = (250, 5, 5)  # a left half, to show the flip: it must land on the right
    for seed in range(20):
        source = Backgrounds()
        sample = transform(foreground, np.zeros((0, 4), np.float32), generator(seed), source)
        assert source.drawn == 2
        for view, box in ((sample["query"], sample["query_box"]), (sample["key"], sample["key_box"])):
            x1, y1, x2, y2 = (int(v) for v in box.tolist())
            expected = torch.zeros((96, 96), dtype=torch.bool)
            expected[y1:y2, x1:x2] = True
            assert torch.equal(painted(view), expected), seed
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
            # the paste keeps the crop's aspect within [1/2, 2] and fits the drawn size range
            width, height = x2 - x1, y2 - y1
            assert max(width, height) <= 90 and 0.5 - 0.05 <= width / height <= 2 + 0.05
            red = denormalize(view)[0]
            left, right = red[y1:y2, x1 + 1].mean(), red[y1:y2, x2 - 2].mean()
            if flip_prob == 1.0:
                assert right <= left  # the darker left half of the foreground is now on the right
        assert torch.equal(sample["query_box_p5"], sample["query_box"])


def test_fitted_size_keeps_the_aspect_and_meets_one_bound():
    assert fitted_size(200, 100, 128, 200) == (200, 100)  # long side to 200 (the larger bound)
    assert fitted_size(200, 100, 150, 60) == (120, 60)  # short side to 60 is the binding one
    assert fitted_size(50, 100, 254, 128) == (127, 254)  # upscaled: the long (vertical) side to 254


def test_grid_anchors_are_the_releases():
    anchors = grid_anchors(256, [32.0, 64.0, 128.0, 256.0])
    assert anchors.shape == (16 * 16 * 20, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert set(centres[:, 0].round().tolist()) == set(range(0, 256, 16))
    sides = anchors[:, 2:] - anchors[:, :2]
    areas = sides.prod(dim=1).sqrt().round().unique().tolist()
    assert areas == [32.0, 64.0, 128.0, 256.0]
    ratios = (sides[:, 1] / sides[:, 0]).round(decimals=2).unique().tolist()
    assert ratios == [0.5, 0.75, 1.0, 1.5, 2.0]


def test_box_augmentation_returns_boxes_overlapping_the_truth_by_more_than_half():
    anchors = grid_anchors(256, [32.0, 64.0, 128.0, 256.0])
    picks = []
    for seed in range(200):
        g = generator(seed)
        x, y = torch.randint(0, 120, (2,), generator=g).tolist()
        w, h = torch.randint(40, 130, (2,), generator=g).tolist()
        truth = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
        picked = augment_box(truth, anchors, g)
        assert box_iou(picked[None], truth[None]).item() > 0.5
        picks.append(tuple(picked.tolist()))
    assert len(set(picks)) > 150  # random among the survivors, not always the closest anchor


def test_bad_values_are_refused():
    # A section is checked once, where it is loaded: validate_section is that check.
    with pytest.raises(ConfigError, match="paste_size"):
        validate_section(InsLocViewsConfig(canvas_size=64, paste_size=[32, 100]), "method.views")
    with pytest.raises(ConfigError, match="blur_prob"):
        validate_section(InsLocViewsConfig(blur_prob=2.0), "method.views")
