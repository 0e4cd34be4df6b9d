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
    pool_rois,
    roi_align_channels_last,
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


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [4, 16])
def test_pooling_matches_hand_computed_aligned_roi_align(stride, channels_last):
    # On a map whose value is its column index, bilinear sampling is exact and the mean of a bin's
    # symmetric samples is the value at the bin centre. With aligned=True pixel i's centre is at
    # image x = (i + 0.5) * stride, so the bin centre in map units is x1/stride - 0.5 + (j + 0.5) * bin_w.
    height, width = 20, 24
    columns = torch.arange(width, dtype=torch.float32).expand(1, 1, height, width)
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(1, 1, height, width)
    feature = torch.cat([columns, rows], dim=1)
    if channels_last:  # the NHWC path (roi_align_channels_last) must land on the same values
        feature = feature.contiguous(memory_format=torch.channels_last)
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


def awkward_rois(count: int, images: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """(count, 5) rois on a 96 x 80 image: inside, across and beyond the borders, tiny, empty and reversed."""
    corners = torch.rand(count, 2, generator=generator, dtype=dtype) * 120 - 15
    sizes = torch.rand(count, 2, generator=generator, dtype=dtype) * 70 - 5  # some negative: reversed boxes
    sizes[: count // 8] = 0.0  # empty boxes
    sizes[count // 8 : count // 4] *= 0.02  # boxes under one map pixel
    boxes = torch.cat([corners, corners + sizes], dim=1)
    # samples exactly on the far edges (x = 24, y = 20 on the 24 x 20 map at stride 4) and on -1: still inside
    boxes[0] = torch.tensor([84.0, 68.0, 112.0, 96.0], dtype=dtype)
    boxes[1] = torch.tensor([-4.0, -4.0, 24.0, 24.0], dtype=dtype)
    image_index = torch.randint(0, images, (count, 1), generator=generator).to(dtype)
    return torch.cat([image_index, boxes], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
def test_channels_last_roi_align_equals_torchvision_with_gradients(aligned):
    # float64, so that the only difference is the order of the sums: 1e-12 catches any wrong sample or weight.
    generator = torch.Generator().manual_seed(4)
    feature = torch.randn(3, 5, 20, 24, generator=generator, dtype=torch.float64)
    rois = awkward_rois(64, 3, generator, torch.float64)
    nhwc = feature.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    nchw = feature.clone().requires_grad_(True)
    ours = roi_align_channels_last(nhwc, rois, 7, 0.25, aligned)
    reference = roi_align(nchw, rois, 7, 0.25, -1, aligned=aligned)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    ours.backward(upstream)
    reference.backward(upstream)
    torch.testing.assert_close(nhwc.grad, nchw.grad, rtol=0, atol=1e-12)
    assert nhwc.grad.abs().sum() > 0


def test_channels_last_pyramid_pooling_equals_nchw_and_keeps_empty_levels_in_the_graph():
    generator = torch.Generator().manual_seed(5)
    features = pyramid(2, 4, 128, generator)
    features = [feature.double() for feature in features]
    boxes = boxes_on_every_level(2, 3, 128, generator).double()
    boxes[:, :, 2:] = boxes[:, :, :2] + 20.0  # every box on P2: P3..P5 get no box
    nhwc = [feature.contiguous(memory_format=torch.channels_last).requires_grad_(True) for feature in features]
    pooled = pool_boxes_per_level(nhwc, boxes, STRIDES, 7)
    torch.testing.assert_close(pooled, pool_boxes_per_level(features, boxes, STRIDES, 7), rtol=0, atol=1e-12)
    pooled.sum().backward()
    assert nhwc[0].grad.abs().sum() > 0
    assert all(feature.grad is not None and torch.count_nonzero(feature.grad) == 0 for feature in nhwc[1:])


def test_channels_last_bf16_map_pools_like_torchvision_in_float32_and_under_autocast():
    # torchvision pools a bf16 map in float32 under autocast; the NHWC path computes in the rois' float32 too.
    generator = torch.Generator().manual_seed(6)
    feature = torch.randn(2, 8, 14, 14, generator=generator).to(torch.bfloat16)
    rois = awkward_rois(24, 2, generator, torch.float32)
    nhwc = feature.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    in_float32 = roi_align_channels_last(nhwc, rois, 7, 1 / 16)
    assert in_float32.dtype == torch.float32
    torch.testing.assert_close(in_float32, roi_align(feature.float(), rois, 7, 1 / 16, -1, aligned=True),
                               rtol=0, atol=1e-5)
    nchw = feature.clone().requires_grad_(True)
    boxes, image_index = rois[:, 1:], rois[:, 0].long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pool_rois(nhwc, boxes, image_index, 16, 7)
        reference = pool_rois(nchw, boxes, image_index, 16, 7)
    assert ours.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference.float(), rtol=1e-2, atol=1e-3)
    ours.float().sum().backward()
    reference.float().sum().backward()
    # the gradient reaches the bf16 map in bf16 in both; where rois overlap, the NHWC path adds in bf16
    torch.testing.assert_close(nhwc.grad.float(), nchw.grad.float(), rtol=1e-2, atol=1e-2)


def test_channels_last_roi_align_gradient_is_the_same_run_to_run_on_two_threads():
    # Overlapping rois send several gradients to one pixel. Advanced indexing's backward adds them with atomics
    # across threads in a timing-dependent order (differing in the last bits run to run); the pixel gather must add
    # them in one fixed order, so that two threads give one answer every time.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(7)
        feature = torch.randn(4, 64, 28, 28, generator=generator).contiguous(memory_format=torch.channels_last)
        corners = torch.rand(64, 2, generator=generator) * 60
        sides = torch.rand(64, 2, generator=generator) * 40 + 8
        rois = torch.cat([torch.randint(0, 4, (64, 1), generator=generator).float(), corners, corners + sides], 1)
        upstream = torch.randn(64, 64, 7, 7, generator=generator)
        gradients = []
        for _ in range(6):
            leaf = feature.clone().requires_grad_(True)
            roi_align_channels_last(leaf, rois, 7, 0.25).backward(upstream)
            gradients.append(leaf.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(gradients[0], gradient) for gradient in gradients[1:])
