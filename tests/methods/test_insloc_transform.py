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


def test_the_paste_never_touches_the_far_edges_as_released():
    # release: copy_and_paste.py:75-76 draws the corner with np.random.randint(0, canvas - side), the end excluded
    config = InsLocViewsConfig(canvas_size=42, paste_size=[40, 40], color_augment=False, flip_prob=0.0,
                               box_augment=False)
    transform = InsLocTransform(config)
    foreground = np.full((50, 50, 3), RED, dtype=np.uint8)  # every paste has a long side of 40
    far_edges = []
    for seed in range(30):
        sample = transform(foreground, np.zeros((0, 4), np.float32), generator(seed), Backgrounds())
        for box in (sample["query_box"], sample["key_box"]):
            x1, y1, x2, y2 = (int(v) for v in box.tolist())
            assert x1 >= 0 and y1 >= 0 and x2 <= 41 and y2 <= 41, (seed, box)
            far_edges += [x2, y2]
    assert 41 in far_edges  # the last position allowed is drawn too


class NoiseBackgrounds:
    """A data set of one random-noise image, larger than the canvas."""

    def __init__(self, image):
        self.image = image

    def draw(self, gen):
        return self.image, np.zeros((0, 4), np.float32), 0


def test_every_resize_is_bilinear_without_antialiasing_as_opencvs_in_the_release():
    # release: mmcv.imresize of the backgrounds (copy_and_paste.py:109-110), mmcv.imrescale of the crops (184-185),
    # both cv2.INTER_LINEAR; downscaling noise tells it from an antialiased resize (which differs by tens of levels)
    cv2 = pytest.importorskip("cv2")
    from soco.data.views import random_resized_crop

    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    config = InsLocViewsConfig(canvas_size=96, paste_size=[40, 90], color_augment=False, flip_prob=0.0,
                               box_augment=False)
    transform = InsLocTransform(config)
    background = transform.background(NoiseBackgrounds(noise), generator(0))
    expected = cv2.resize(noise, (96, 96), interpolation=cv2.INTER_LINEAR)
    assert np.abs(background.permute(1, 2, 0).numpy().astype(int) - expected.astype(int)).max() <= 1
    foreground = torch.from_numpy(noise).permute(2, 0, 1).contiguous()
    composite, box = transform.composite(foreground, torch.zeros(3, 96, 96, dtype=torch.uint8), generator(1))
    g = generator(1)  # the same draws replayed: the crop, then the target size
    top, left, crop_h, crop_w = random_resized_crop(300, 400, config.crop_scale, config.crop_ratio, g)
    x1, y1, x2, y2 = (int(v) for v in box.tolist())
    patch = cv2.resize(noise[top:top + crop_h, left:left + crop_w], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    pasted = composite[:, y1:y2, x1:x2].permute(1, 2, 0).numpy().astype(int)
    assert max(crop_w / (x2 - x1), crop_h / (y2 - y1)) > 1.5  # a real downscale, where antialiasing would show
    assert np.abs(pasted - patch.astype(int)).max() <= 1
