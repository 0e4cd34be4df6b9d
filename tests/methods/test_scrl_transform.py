"""SCRL's views and box pairs: both boxes of a pair cover the same image content, for every crop and flip."""

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from soco.config.validation import validate_section
from soco.data.views import ViewParams
from soco.errors import ConfigError
from soco.methods.scrl_transform import (
    SCRLTransform,
    SCRLViewsConfig,
    box_pairs,
    common_region,
    resize_blur,
    sample_boxes,
    working_scale,
)

WIDTH, HEIGHT = 400, 300


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coordinate_image() -> np.ndarray:
    """An RGB image whose red channel encodes x and green encodes y (a smooth ramp each)."""
    xs = np.linspace(0, 255, WIDTH)[None, :].repeat(HEIGHT, axis=0)
    ys = np.linspace(0, 255, HEIGHT)[:, None].repeat(WIDTH, axis=1)
    return np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).round().astype(np.uint8)


def to_original(boxes: torch.Tensor, crop: ViewParams) -> torch.Tensor:
    """By hand: un-flip, un-scale and un-shift view boxes back to original pixels."""
    boxes = boxes.double()
    x1, y1, x2, y2 = boxes.unbind(1)
    if crop.flip:
        x1, x2 = crop.size - x2, crop.size - x1
    scale_x, scale_y = crop.size / crop.width, crop.size / crop.height
    return torch.stack([x1 / scale_x + crop.left, y1 / scale_y + crop.top,
                        x2 / scale_x + crop.left, y2 / scale_y + crop.top], dim=1)


def decode_centre(view: torch.Tensor, box: torch.Tensor) -> tuple[float, float]:
    """Original (x, y) read from the coordinate image's pixels at a box's centre in a normalised view."""
    mean, std = torch.tensor([0.485, 0.456]), torch.tensor([0.229, 0.224])
    cx, cy = float((box[0] + box[2]) / 2), float((box[1] + box[3]) / 2)
    column, row = min(int(cx), view.shape[-1] - 1), min(int(cy), view.shape[-2] - 1)
    red, green = (view[:2, row, column] * std + mean).tolist()
    return red * (WIDTH - 1), green * (HEIGHT - 1)


def test_both_boxes_of_a_pair_cover_the_same_region_for_every_crop_and_flip():
    config = SCRLViewsConfig(size=96, color_augment=False, min_box_size=14)
    transform = SCRLTransform(config)
    image = coordinate_image()
    flips_seen, pairs_seen = set(), 0
    for seed in range(60):
        first, second = transform.crops(HEIGHT, WIDTH, generator(seed))
        sample = transform(image, np.zeros((0, 4), np.float32), generator(seed))
        boxes1, boxes2 = sample["boxes"]["v1"], sample["boxes"]["v2"]
        assert boxes1.shape == boxes2.shape and boxes1.shape[0] in (0, config.boxes_per_image)
        if not len(boxes1):
            continue
        flips_seen.add((first.flip, second.flip))
        pairs_seen += len(boxes1)
        # geometry: mapped back to the original image, both boxes are the same box (before clipping they are
        # exact; the region lies inside both crops, so clipping moves nothing)
        torch.testing.assert_close(to_original(boxes1, first), to_original(boxes2, second), atol=1e-3, rtol=0)
        region = common_region(first, second)
        original = to_original(boxes1, first)
        assert (original[:, 0] >= region[0] - 1e-3).all() and (original[:, 2] <= region[2] + 1e-3).all()
        assert (original[:, 1] >= region[1] - 1e-3).all() and (original[:, 3] <= region[3] + 1e-3).all()
        # pixels: the content at each box's centre decodes to the same original point in both views
        for box1, box2 in zip(boxes1, boxes2):
            x1, y1 = decode_centre(sample["views"]["v1"], box1)
            x2, y2 = decode_centre(sample["views"]["v2"], box2)
            # a view pixel covers at most 400/96 original pixels (a crop side never exceeds the image side)
            assert abs(x1 - x2) < 6.0 and abs(y1 - y2) < 6.0, (seed, x1, x2, y1, y2)
    assert flips_seen == {(False, False), (False, True), (True, False), (True, True)}
    assert pairs_seen >= 300


def test_boxes_respect_the_minimum_size_in_working_units_and_the_views():
    config = SCRLViewsConfig(size=224)
    transform = SCRLTransform(config)
    for seed in range(30):
        first, second = transform.crops(HEIGHT, WIDTH, generator(seed))
        boxes1, boxes2 = box_pairs(first, second, config, generator(seed))
        if not len(boxes1):
            continue
        scale_x, scale_y = working_scale(first, second)
        original = to_original(boxes1, first)
        widths = (original[:, 2] - original[:, 0]) * scale_x
        heights = (original[:, 3] - original[:, 1]) * scale_y
        assert (widths >= 32 - 1e-6).all() and (heights >= 32 - 1e-6).all()
        for boxes in (boxes1, boxes2):
            assert boxes.min() >= 0 and boxes.max() <= 224


def test_no_box_when_the_crops_do_not_overlap_or_their_overlap_is_too_small():
    config = SCRLViewsConfig(size=224)
    left = ViewParams("v", 0, 0, 100, 100, False, 224)
    assert box_pairs(left, ViewParams("v", 0, 150, 100, 100, False, 224), config, generator(0))[0].shape == (0, 4)
    # touching edges share no pixel
    assert common_region(left, ViewParams("v", 0, 100, 100, 100, False, 224)) is None
    # 14 original pixels of overlap = 14 * 2.24 = 31.4 working pixels <= 32: no box
    assert box_pairs(left, ViewParams("v", 0, 86, 100, 100, False, 224), config, generator(0))[0].shape == (0, 4)
    # 16 pixels = 35.8 working pixels: ten boxes
    assert box_pairs(left, ViewParams("v", 0, 84, 100, 100, False, 224), config, generator(0))[0].shape == (10, 4)


def test_working_scale_is_where_the_region_looks_smaller():
    big = ViewParams("v", 0, 0, 200, 100, False, 224)  # 2.24 px/px across, 1.12 down
    small = ViewParams("v", 0, 0, 50, 150, True, 224)  # 1.49 across, 4.48 down
    assert working_scale(big, small) == pytest.approx((224 / 150, 224 / 200))


def test_overlap_rejection_keeps_ious_below_the_bound_when_it_can():
    config = SCRLViewsConfig()
    worst = 0.0
    for seed in range(100):
        boxes = sample_boxes(224.0, 224.0, config, generator(seed))
        ious = box_iou(boxes, boxes)
        worst = max(worst, float(ious[~torch.eye(len(boxes), dtype=torch.bool)].max()))
    assert worst < 0.5
    without = SCRLViewsConfig(overlap_retries=0)
    worst_without = max(
        float(box_iou(b, b)[~torch.eye(10, dtype=torch.bool)].max())
        for b in (sample_boxes(224.0, 224.0, without, generator(seed)) for seed in range(100)))
    assert worst_without >= 0.5  # the bound is the rejection's doing
    # a region barely larger than one box: after the retries the last draw is kept, so still K boxes
    crowded = sample_boxes(33.0, 33.0, config, generator(0))
    assert crowded.shape == (10, 4)


def test_grid_sampling_favours_small_boxes_and_plain_does_not():
    grid = torch.cat([sample_boxes(224.0, 224.0, SCRLViewsConfig(overlap_retries=0), generator(s)) for s in range(50)])
    plain = torch.cat([sample_boxes(224.0, 224.0, SCRLViewsConfig(box_sampling="plain", overlap_retries=0),
                                    generator(s)) for s in range(50)])
    for boxes in (grid, plain):
        assert boxes[:, :2].min() >= 0 and boxes[:, 2:].max() <= 224 + 1e-9
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 32 - 1e-9).all()
    grid_side = (grid[:, 2:] - grid[:, :2]).mean()
    plain_side = (plain[:, 2:] - plain[:, :2]).mean()
    assert grid_side < 0.75 * plain_side  # plain: uniform in [32, 224), mean 128


def test_jitter_moves_only_the_second_view_box():
    config = SCRLViewsConfig(box_jitter=True, jitter_range=0.1)
    first, second = ViewParams("v", 0, 0, 300, 300, False, 224), ViewParams("v", 0, 0, 300, 300, False, 224)
    plain1, plain2 = box_pairs(first, second, SCRLViewsConfig(), generator(3))
    moved1, moved2 = box_pairs(first, second, config, generator(3))
    torch.testing.assert_close(moved1, plain1)
    assert not torch.allclose(moved2, plain2)
    sides = plain2[:, 2:] - plain2[:, :2]
    assert ((moved2 - plain2).abs()[:, :2] <= 0.1 * sides + 1e-4).all()


def test_resize_blur_keeps_the_size_and_smooths():
    image = torch.rand((3, 64, 64), generator=generator(0))
    blurred = resize_blur(image, 1.5)
    assert blurred.shape == image.shape and blurred.min() >= 0 and blurred.max() <= 1
    variation = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert variation(blurred) < 0.8 * variation(image)


def test_collate_concatenates_a_variable_number_of_boxes_with_their_image_index():
    transform = SCRLTransform(SCRLViewsConfig(size=32, min_box_size=8, boxes_per_image=3))
    empty = {"views": {"v1": torch.zeros(3, 32, 32), "v2": torch.zeros(3, 32, 32)},
             "boxes": {"v1": torch.zeros((0, 4)), "v2": torch.zeros((0, 4))}}
    full = {"views": {"v1": torch.ones(3, 32, 32), "v2": torch.ones(3, 32, 32)},
            "boxes": {"v1": torch.arange(12.0).view(3, 4), "v2": torch.arange(12.0).view(3, 4) + 1}}
    batch = transform.collate([full, empty, full])
    assert batch["views"]["v1"].shape == (3, 3, 32, 32)
    assert batch["boxes"]["v2"].shape == (6, 4) and batch["box_image"].tolist() == [0, 0, 0, 2, 2, 2]
    assert batch["boxes_per_image"].tolist() == [3, 0, 3]


def test_bad_values_are_refused():
    # A section is checked once, where it is loaded: validate_section is that check.
    for bad in (dict(blur="box"), dict(box_sampling="random"), dict(min_box_size=300), dict(crop_scale=[0.5, 1.2]),
                dict(max_overlap=1.5)):
        with pytest.raises(ConfigError, match="method.views"):
            validate_section(SCRLViewsConfig(**bad), "method.views")


def test_a_box_gets_fifty_draws_at_most_as_released(monkeypatch):
    """models/box_generator.py 76: `for _ in range(50)` per box; a box that always overlaps is drawn 50 times."""
    import soco.methods.scrl_transform as scrl_transform

    draws = []

    def same_box(width, height, config, generator):
        draws.append(1)
        return torch.tensor([0.0, 0.0, 40.0, 40.0])

    monkeypatch.setattr(scrl_transform, "sample_box", same_box)
    boxes = scrl_transform.sample_boxes(224.0, 224.0, SCRLViewsConfig(boxes_per_image=2), generator(0))
    assert len(boxes) == 2 and len(draws) == 1 + 50
