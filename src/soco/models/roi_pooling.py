"""RoIAlign of object boxes on feature maps: scale-aware per-level pooling, the release's all-level way, one level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import roi_align

DEFAULT_THRESHOLDS = (48.0, 96.0, 192.0)
DEFAULT_STRIDES = (4, 8, 16, 32)
ADAPTIVE_SAMPLING = -1  # roi_align picks ceil(bin size) samples per bin, as Detectron2's ROIAlignV2


def assign_levels(boxes: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> torch.Tensor:
    """Pyramid level index per box (0..len(thresholds), i.e. P2..P5) from sqrt(area); upper bounds inclusive."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4), got {tuple(boxes.shape)}")
    # float64 so that sqrt(w*h) of a square box is exactly its side and the boundaries fall as written.
    boxes64 = boxes.detach().to(torch.float64)
    widths = (boxes64[:, 2] - boxes64[:, 0]).clamp(min=0)
    heights = (boxes64[:, 3] - boxes64[:, 1]).clamp(min=0)
    scales = torch.sqrt(widths * heights)
    boundaries = torch.tensor([float(t) for t in thresholds], dtype=torch.float64, device=boxes.device)
    # right=False: index i with boundaries[i-1] < scale <= boundaries[i], so a scale equal to 48 stays on P2.
    return torch.bucketize(scales, boundaries, right=False)


def boxes_to_rois(boxes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, N, 4) boxes (N per image) as (B*N, 5) roi_align rows [image index, x1, y1, x2, y2], image-major."""
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, N, 4), got {tuple(boxes.shape)}")
    batch, per_image = boxes.shape[:2]
    image_index = torch.arange(batch, device=boxes.device, dtype=dtype).repeat_interleave(per_image)
    return torch.cat([image_index[:, None], boxes.reshape(-1, 4).to(dtype)], dim=1)


def _rois_dtype(feature: torch.Tensor) -> torch.dtype:
    """float64 for float64 maps, else float32: box corners in bf16 would move by up to a pixel."""
    return torch.float64 if feature.dtype == torch.float64 else torch.float32


def _axis_weights(start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, size: int,
                  output_size: int) -> torch.Tensor:
    """(R, output_size, size) bilinear weights of one axis: how much each map row (or column) adds to each bin.

    The sample points, the border rules and the weights are torchvision's roi_align kernel's, one axis at a
    time: a sample's weight in 2-D is the product of its row weight and its column weight, and a sample
    outside the map in either axis has a zero weight in that axis.
    """
    rois = start.shape[0]
    samples = max(int(grid.max().item()), 1) if rois else 1
    bins = torch.arange(output_size, dtype=start.dtype, device=start.device)[None, :, None]
    sample = torch.arange(samples, dtype=start.dtype, device=start.device)[None, None, :]
    # a roi of no width has no samples (all invalid below); dividing by 1 keeps its coordinates finite
    grid3, bin3 = grid.clamp(min=1)[:, None, None], bin_size[:, None, None]
    # the kernel's own order of operations, so that floor() falls on the same side of a pixel edge
    coordinate = start[:, None, None] + bins * bin3 + (sample + 0.5) * bin3 / grid3
    valid = (coordinate >= -1.0) & (coordinate <= size) & (sample < grid[:, None, None])
    coordinate = coordinate.clamp(min=0)
    low = coordinate.floor().long()
    at_end = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_end, low, low + 1)
    fraction = torch.where(at_end, torch.zeros_like(coordinate), coordinate - low.to(coordinate.dtype))
    weights = torch.zeros(rois, output_size, size, dtype=start.dtype, device=start.device)
    weights.scatter_add_(2, low.flatten(2), ((1 - fraction) * valid).flatten(2))
    weights.scatter_add_(2, high.flatten(2), (fraction * valid).flatten(2))
    return weights


def _window(weights: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (or columns) each roi reads, padded to one width: (R, W) indices and (R, S, W) their weights."""
    used = weights.ne(0).any(dim=1)
    index = torch.arange(size, device=weights.device)
    first = torch.where(used, index, size).amin(dim=1).clamp(max=size - 1)
    last = torch.where(used, index, -1).amax(dim=1)
    width = max(int((last - first + 1).max().item()), 1) if first.numel() else 1
    positions = first[:, None] + torch.arange(width, device=weights.device)
    inside = positions < size
    positions = positions.clamp(max=size - 1)
    window_weights = torch.gather(weights, 2, positions[:, None, :].expand(-1, weights.shape[1], -1))
    return positions, window_weights * inside[:, None, :]


def roi_align_channels_last(feature: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
                            aligned: bool = True) -> torch.Tensor:
    """torchvision's roi_align (adaptive sampling) on an NHWC map without converting the whole map to NCHW.

    torchvision's kernel makes the map contiguous first: on channels-last maps that is a copy of every
    level for every view, forward and backward, though the boxes read a few windows of it. Here each roi
    reads only the rows and columns its samples touch, and the bilinear sum is two small batched matrix
    products (the weights are separable in y and x). Computes in the rois' dtype, like the kernel under
    autocast; equal to torchvision to float rounding (tests/models/test_roi_pooling.py).
    """
    channels, height, width = feature.shape[1:]
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, column] * spatial_scale - offset for column in (1, 2, 3, 4))
    roi_width, roi_height = x2 - x1, y2 - y1
    if not aligned:  # the kernel's legacy mode forces malformed rois to 1x1
        roi_width, roi_height = roi_width.clamp(min=1.0), roi_height.clamp(min=1.0)
    bin_width, bin_height = roi_width / output_size, roi_height / output_size
    grid_width, grid_height = torch.ceil(bin_width).clamp(min=0), torch.ceil(bin_height).clamp(min=0)
    rows, row_weights = _window(_axis_weights(y1, bin_height, grid_height, height, output_size), height)
    columns, column_weights = _window(_axis_weights(x1, bin_width, grid_width, width, output_size), width)
    count = (grid_height * grid_width).clamp(min=1)
    image = rois[:, 0].long()
    # index_select of the map's pixel rows, not advanced indexing: the windows overlap, and the backward of
    # advanced indexing (index_put_ with accumulate) adds float gradients with atomics on several threads, in an
    # order that changes from run to run; index_select's backward (index_add_) adds them in index order.
    pixels = feature.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: the map is NHWC in memory
    pixel_index = (image[:, None, None] * height + rows[:, :, None]) * width + columns[:, None, :]
    windows = pixels.index_select(0, pixel_index.reshape(-1)).view(*pixel_index.shape, channels).to(rois.dtype)
    number, window_rows, window_columns = windows.shape[:3]  # (R, h, w, C)
    with torch.autocast(feature.device.type, enabled=False):
        # columns first, then rows, so that the result is laid out (R, S, S, C): NHWC for the box head
        by_column = windows.transpose(1, 2).reshape(number, window_columns, window_rows * channels)
        pooled = torch.bmm(column_weights, by_column).view(number, output_size, window_rows, channels)
        by_row = pooled.transpose(1, 2).reshape(number, window_rows, output_size * channels)
        pooled = torch.bmm(row_weights, by_row).view(number, output_size, output_size, channels)
    pooled = pooled / count[:, None, None, None]
    return pooled.permute(0, 3, 1, 2)  # (R, C, S, S), channels-last in memory like the map


def torchvision_align(feature: torch.Tensor, rois: torch.Tensor, stride: float, output_size: int,
                      aligned: bool = True) -> torch.Tensor:
    """torchvision's roi_align with adaptive sampling, a low-precision map pooled in the rois' precision outside autocast."""
    if feature.dtype != rois.dtype and not torch.is_autocast_enabled(feature.device.type):
        # The kernel requires equal dtypes; under autocast torchvision casts both to float32 itself.
        pooled = roi_align(
            feature.to(rois.dtype), rois, output_size, 1.0 / stride, ADAPTIVE_SAMPLING, aligned=aligned
        )
        return pooled.to(feature.dtype)
    return roi_align(feature, rois, output_size, 1.0 / stride, ADAPTIVE_SAMPLING, aligned=aligned)


def _align(feature: torch.Tensor, rois: torch.Tensor, stride: float, output_size: int,
           aligned: bool = True) -> torch.Tensor:
    """RoIAlign of rois on one map: NHWC CPU maps in place (roi_align_channels_last), others by torchvision."""
    if feature.device.type == "cpu" and feature.ndim == 4 and feature.shape[1] > 1 and \
            feature.is_contiguous(memory_format=torch.channels_last) and not feature.is_contiguous():
        # in the map's dtype, as torchvision returns it under autocast too
        return roi_align_channels_last(feature, rois, output_size, 1.0 / stride, aligned).to(feature.dtype)
    return torchvision_align(feature, rois, stride, output_size, aligned)


def pool_rois(feature: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, stride: float,
              output_size: int, aligned: bool = True) -> torch.Tensor:
    """(N, C, S, S) RoI features of N boxes (x1 y1 x2 y2, any number per image) on one map.

    `image_index` (N,) says which image of the batch each box belongs to; N may be 0.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or image_index.shape != boxes.shape[:1]:
        raise ValueError(f"boxes must be (N, 4) with an (N,) image index, got {tuple(boxes.shape)} "
                         f"and {tuple(image_index.shape)}")
    dtype = _rois_dtype(feature)
    rois = torch.cat([image_index.to(dtype)[:, None], boxes.to(dtype)], dim=1)
    return _align(feature, rois, stride, output_size, aligned)


def _check_levels(features: Sequence[torch.Tensor], strides: Sequence[float], boxes: torch.Tensor) -> None:
    """Raise if the pyramid, its strides and the boxes' batch do not agree."""
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature maps but {len(strides)} strides")
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, N, 4), got {tuple(boxes.shape)}")
    for feature in features:
        if feature.shape[0] != boxes.shape[0]:
            raise ValueError(f"feature batch {feature.shape[0]} != boxes batch {boxes.shape[0]}")


def pool_boxes_per_level(
    features: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    strides: Sequence[float] = DEFAULT_STRIDES,
    output_size: int = 7,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B*N, C, S, S) RoI features, image-major, each box pooled only on its own level (one roi_align per level).

    `levels` (B*N,) overrides the scale-aware assignment, e.g. every box on one fixed level.
    """
    _check_levels(features, strides, boxes)
    if levels is None:
        levels = assign_levels(boxes.reshape(-1, 4), thresholds)
    rois = boxes_to_rois(boxes, _rois_dtype(features[0]))
    # One stable sort and one host sync for the counts, instead of one nonzero() sync per level.
    order = torch.argsort(levels, stable=True)
    counts = torch.bincount(levels, minlength=len(features)).tolist()
    if len(counts) > len(features):
        raise ValueError(f"level index {len(counts) - 1} out of range for {len(features)} levels")
    pooled_per_level = []
    for feature, stride, rois_of_level in zip(features, strides, torch.split(rois[order], counts)):
        # Called even with no box: the empty result keeps the level in the autograd graph, so its
        # parameters get zero gradients rather than none (DDP fails on parameters without gradients).
        pooled_per_level.append(_align(feature, rois_of_level, stride, output_size))
    pooled_sorted = torch.cat(pooled_per_level)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return pooled_sorted[inverse]


def pool_boxes_all_levels(
    features: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    strides: Sequence[float] = DEFAULT_STRIDES,
    output_size: int = 7,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    levels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's way: every box pooled on every level, (L, B*N, C, S, S), with the (L, B*N) own-level mask."""
    _check_levels(features, strides, boxes)
    if levels is None:
        levels = assign_levels(boxes.reshape(-1, 4), thresholds)
    rois = boxes_to_rois(boxes, _rois_dtype(features[0]))
    pooled = torch.stack([_align(feature, rois, stride, output_size) for feature, stride in zip(features, strides)])
    level_ids = torch.arange(len(features), device=levels.device)
    mask = levels[None, :] == level_ids[:, None]
    return pooled, mask


def pool_boxes_single_level(
    feature: torch.Tensor, boxes: torch.Tensor, stride: float, output_size: int = 7
) -> torch.Tensor:
    """(B*N, C, S, S) RoI features of every box on one map (C4 variant, FPN off, scale-aware off)."""
    _check_levels([feature], [stride], boxes)
    return _align(feature, boxes_to_rois(boxes, _rois_dtype(feature)), stride, output_size)


class BoxPooler(torch.nn.Module):
    """RoIAlign of (B, N, 4) boxes on one map or a pyramid, each box on its own level; no parameters.

    Levels come from sqrt(box area) against `thresholds` (scale-aware, one threshold fewer than maps),
    or every box goes to `fixed_level` (an index into the maps). One map needs neither.
    """

    def __init__(self, strides: Sequence[float], output_size: int, thresholds: Sequence[float] | None = None,
                 fixed_level: int | None = None):
        super().__init__()
        self.strides = tuple(float(s) for s in strides)
        self.output_size = int(output_size)
        self.thresholds = tuple(float(t) for t in thresholds) if thresholds is not None else None
        self.fixed_level = fixed_level
        if len(self.strides) > 1 and (self.thresholds is None) == (fixed_level is None):
            raise ValueError("a pyramid pooler needs either level thresholds or a fixed level")
        if self.thresholds is not None and len(self.thresholds) != len(self.strides) - 1:
            raise ValueError(f"{len(self.strides)} levels need {len(self.strides) - 1} thresholds, "
                             f"got {list(self.thresholds)}")
        if fixed_level is not None and not 0 <= fixed_level < len(self.strides):
            raise ValueError(f"fixed level index {fixed_level} is not one of the {len(self.strides)} maps")

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B*N,) index of the map each box is pooled on."""
        flat_boxes = boxes.reshape(-1, 4)
        if self.thresholds is not None:
            return assign_levels(flat_boxes, self.thresholds)
        level = self.fixed_level or 0
        return torch.full((flat_boxes.shape[0],), level, dtype=torch.long, device=boxes.device)

    def forward(self, features: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """(B*N, C, S, S) pooled features, image-major."""
        if len(features) == 1:
            return pool_boxes_single_level(features[0], boxes, self.strides[0], self.output_size)
        return pool_boxes_per_level(features, boxes, self.strides, self.output_size, levels=self.levels(boxes))

    def pool_every_level(self, features: Sequence[torch.Tensor], boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The release's way: (L, B*N, C, S, S) every box on every map, and the (B*N,) own level of each."""
        levels = self.levels(boxes)
        pooled, _ = pool_boxes_all_levels(features, boxes, self.strides, self.output_size, levels=levels)
        return pooled, levels
