"""Tests of scale-aware level assignment and RoI pooling against roi_align and a hand-computed RoIAlign."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from soco.models.roi_pooling import (
    assign_levels,
    boxes_to_rois,
    pool_boxes_all_levels,
    pool_boxes_per_level,
    pool_boxes_single_level,
)

STRIDES = (4, 8, 16, 32)


def square_box(side: float, x1: float = 0.0, y1: float = 0.0) -> list[float]:
    """A side x side box whose sqrt(area) is the side."""
    return [x1, y1, x1 + side, y1 + side]


def pyramid(batch: int, channels: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Random P2..P5 maps for size x size images."""
    return [torch.randn(batch, channels, -(-size // s), -(-size // s), generator=generator) for s in STRIDES]


def boxes_on_every_level(batch: int, per_image: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, per_image, 4) boxes inside a size x size view whose scales cover P2..P5."""
    sides = torch.linspace(20.0, size * 0.95, batch * per_image)[torch.randperm(batch * per_image, generator=generator)]
    aspect = torch.empty(batch * per_image).uniform_(0.5, 2.0, generator=generator)
    widths = (sides * aspect.sqrt()).clamp(max=size - 1)
    heights = (sides / aspect.sqrt()).clamp(max=size - 1)
    x1 = torch.rand(batch * per_image, generator=generator) * (size - widths)
    y1 = torch.rand(batch * per_image, generator=generator) * (size - heights)
    return torch.stack([x1, y1, x1 + widths, y1 + heights], dim=1).reshape(batch, per_image, 4)


def test_assign_levels_at_exact_boundaries():
    sides = [10.0, 48.0, 48.01, 96.0, 96.5, 192.0, 192.5, 400.0]
    boxes = torch.tensor([square_box(side, 3.0, 7.0) for side in sides])
    assert assign_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_assign_levels_uses_sqrt_area_of_rectangles():
    # 24 x 96 has sqrt(area) 48 (P2) although its long side is 96; 36 x 256 has 96 (P3).
    boxes = torch.tensor([[0.0, 0.0, 24.0, 96.0], [0.0, 0.0, 256.0, 36.0], [0.0, 0.0, 0.0, 0.0]])
    assert assign_levels(boxes).tolist() == [0, 1, 0]


def test_assign_levels_custom_thresholds():
    boxes = torch.tensor([square_box(side) for side in (16.0, 16.5, 32.0, 56.0, 57.0)])
    assert assign_levels(boxes, (16, 32, 56)).tolist() == [0, 1, 1, 2, 3]


def test_boxes_to_rois_is_image_major():
    boxes = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    rois = boxes_to_rois(boxes)
    assert rois[:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(rois[4, 1:], boxes[1, 1])


def test_per_level_pooling_equals_all_level_pooling_with_mask():
    generator = torch.Generator().manual_seed(0)
    features = pyramid(3, 8, 256, generator)
    boxes = boxes_on_every_level(3, 8, 256, generator)
    levels = assign_levels(boxes.reshape(-1, 4))
    assert set(levels.tolist()) == {0, 1, 2, 3}

    per_level = pool_boxes_per_level(features, boxes, STRIDES, 7)
    all_levels, mask = pool_boxes_all_levels(features, boxes, STRIDES, 7)
    assert per_level.shape == (24, 8, 7, 7)
    assert all_levels.shape == (4, 24, 8, 7, 7)
    assert mask.shape == (4, 24) and torch.equal(mask.sum(0), torch.ones(24, dtype=torch.long))
    assert torch.equal(mask.float().argmax(0), levels)
    # roi_align pools each box independently, so the subset calls give bit-identical features.
    assert torch.equal(per_level, all_levels[levels, torch.arange(24)])
    assert torch.equal(per_level, (all_levels * mask[:, :, None, None, None]).sum(0))


def test_pooled_box_equals_roi_align_on_its_own_level():
    generator = torch.Generator().manual_seed(1)
    features = pyramid(2, 5, 256, generator)
    boxes = boxes_on_every_level(2, 4, 256, generator)
    pooled = pool_boxes_per_level(features, boxes, STRIDES, 7)
    levels = assign_levels(boxes.reshape(-1, 4))
    image, slot = 1, 2
    row = image * 4 + slot
    level = int(levels[row])
    expected = roi_align(
        features[level][image : image + 1],
        [boxes[image, slot][None]],
        output_size=7,
        spatial_scale=1.0 / STRIDES[level],
        sampling_ratio=-1,
        aligned=True,
    )
    assert torch.equal(pooled[row : row + 1], expected)


@pytest.mark.parametrize("stride", [4, 16])
def test_pooling_matches_hand_computed_aligned_roi_align(stride):
    # On a map whose value is its column index, bilinear sampling is exact and the mean of a bin's
    # symmetric samples is the value at the bin centre. With aligned=True pixel i's centre is at
    # image x = (i + 0.5) * stride, so the bin centre in map units is x1/stride - 0.5 + (j + 0.5) * bin_w.
    height, width = 20, 24
    columns = torch.arange(width, dtype=torch.float32).expand(1, 1, height, width)
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(1, 1, height, width)
    feature = torch.cat([columns, rows], dim=1)
    x1, y1, x2, y2 = 3.3 * stride, 2.1 * stride, 17.9 * stride, 15.2 * stride
    pooled = pool_boxes_single_level(feature, torch.tensor([[[x1, y1, x2, y2]]]), stride, 7)
    bins = torch.arange(7, dtype=torch.float32) + 0.5
    expected_x = x1 / stride - 0.5 + bins * (x2 - x1) / stride / 7
    expected_y = y1 / stride - 0.5 + bins * (y2 - y1) / stride / 7
    torch.testing.assert_close(pooled[0, 0], expected_x.expand(7, 7), rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled[0, 1], expected_y[:, None].expand(7, 7), rtol=0, atol=1e-5)


def test_explicit_levels_override_assignment_and_match_single_level():
    generator = torch.Generator().manual_seed(2)
    features = pyramid(2, 4, 128, generator)
    boxes = boxes_on_every_level(2, 3, 128, generator)
    fixed = torch.full((6,), 3, dtype=torch.long)
    per_level = pool_boxes_per_level(features, boxes, STRIDES, 7, levels=fixed)
    single = pool_boxes_single_level(features[3], boxes, STRIDES[3], 7)
    assert torch.equal(per_level, single)


def test_single_level_c4_size():
    feature = torch.randn(2, 6, 4, 4)
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0]], [[8.0, 8.0, 40.0, 30.0]]])
    assert pool_boxes_single_level(feature, boxes, 16, 14).shape == (2, 6, 14, 14)


def test_empty_levels_still_receive_gradients():
    # DDP needs a gradient for every parameter; the empty roi_align calls keep unused levels in the graph.
    features = [torch.randn(1, 3, 64 // s, 64 // s, requires_grad=True) for s in STRIDES]
    boxes = torch.tensor([[square_box(20.0), square_box(30.0, 5.0, 5.0)]])
    pool_boxes_per_level(features, boxes, STRIDES, 7).sum().backward()
    assert all(feature.grad is not None for feature in features)
    assert features[0].grad.abs().sum() > 0
    assert all(torch.count_nonzero(feature.grad) == 0 for feature in features[1:])


def test_low_precision_maps_pool_in_float32_boxes():
    generator = torch.Generator().manual_seed(3)
    feature = torch.randn(1, 4, 8, 8, generator=generator)
    boxes = torch.tensor([[[10.3, 12.7, 100.9, 90.1]]])
    pooled = pool_boxes_single_level(feature.to(torch.bfloat16), boxes, 16, 7)
    assert pooled.dtype == torch.bfloat16
    reference = pool_boxes_single_level(feature.to(torch.bfloat16).float(), boxes, 16, 7)
    torch.testing.assert_close(pooled.float(), reference, rtol=1e-2, atol=1e-2)


def test_shape_errors():
    with pytest.raises(ValueError):
        assign_levels(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        pool_boxes_per_level([torch.zeros(1, 2, 4, 4)], torch.zeros(1, 2, 4), (4, 8))
    with pytest.raises(ValueError):
        pool_boxes_single_level(torch.zeros(2, 2, 4, 4), torch.zeros(1, 2, 4), 4)
