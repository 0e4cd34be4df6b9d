"""Selective search (Uijlings et al.) that turns an RGB image into raw, unfiltered proposal boxes.

Four algorithms:

* ``release`` (the default): SoCo's release's own selective search, box for box: the ``selectivesearch``
  package with the one line the release changed (the LBP texture histogram binned over (0, 255)), at the
  release's scale=300, sigma=0.9, min_size=100, its rects as boxes in its order, duplicates kept
  (``release_selective_search_boxes``; tested against the release's function rebuilt from the installed
  package, ``tests/reference/release_selective_search.py``); photos over 1024 px are shrunk first.
* ``package``: the default before ``release`` (then named ``fast``): the ``selectivesearch`` package 0.4 as
  the package ships it, at scale=500, sigma=0.9, min_size=10 (soco's earlier choice, not the release's),
  box for box with an exclusive max edge and duplicates dropped (``package_selective_search_boxes``).
* ``rich``: the default before ``package``: the same grouping as ``repaired`` on a 160 px copy, pooled over
  four similarity weightings (the "diversification" of Uijlings et al.). About 3.4 times as many kept
  boxes as the package.
* ``repaired`` (before named ``reference``, though it is not the release): the algorithm of the paper at the
  image's original resolution, with the release's parameters (scale=300, sigma=0.9, min_size=100) and
  its quirks repaired: HSV colour histograms (25 bins per channel), LBP texture histograms (10 bins per
  channel), similarity = colour + texture + size + fill, greedy merging of the most similar touching
  pair; every region yields a box.

Boxes are float32 ``(N, 4)`` arrays of ``x1 y1 x2 y2`` in original-image pixels with an exclusive
max edge (a region covering columns 3..10 gives ``x1 = 3, x2 = 11``), clipped to the image.

Differences of ``repaired`` and ``rich`` from the classic pure-Python implementation, all deliberate:

* Neighbours are regions that touch (4-connectivity on the label map), as in the paper; the classic
  code used bounding-box overlap, which also merges regions that never touch.
* Histograms bin the actual value ranges (HSV in [0, 1], LBP codes in [0, 256)); the classic code
  binned HSV over 0..255 and LBP codes over [0, 1], so its histograms carried almost no information.
* Colour and texture histograms are L1-normalised over the whole vector, so that each of the four
  similarity terms lies in [0, 1] as in the paper.
* Boxes use an exclusive max edge; the classic code reported ``max - min`` as the width.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from soco.data.proposals.felzenszwalb import felzenszwalb
from soco.data.proposals.filter import deduplicate_boxes
from soco.errors import ConfigError

COLOUR_BINS = 25
TEXTURE_BINS = 10
_LBP_CODES = 256  # "default" LBP with 8 neighbours gives codes 0..255


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Return the image as a contiguous (H, W, 3) uint8 array (grey is replicated, alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"selective search expects a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"selective search expects an (H, W, 3) RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _repaired_pixel_bins(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour and texture bin of every pixel and channel, repaired: HSV over [0, 1], LBP codes over [0, 256) (skimage)."""
    from skimage.color import rgb2hsv
    from skimage.feature import local_binary_pattern

    hsv = rgb2hsv(rgb)
    colour = np.minimum((hsv * COLOUR_BINS).astype(np.int64), COLOUR_BINS - 1)
    texture = np.stack(
        [local_binary_pattern(rgb[:, :, c], 8, 1.0).astype(np.int64) for c in range(3)], axis=2
    )
    return colour, texture * TEXTURE_BINS // _LBP_CODES


def _rich_pixel_bins(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour and texture bins from OpenCV's 8-bit HSV and a 3x3 LBP (cheaper, nearly the same)."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)  # all three channels span 0..255
    colour = hsv.astype(np.int64) * COLOUR_BINS // 256
    # LBP on the 8 integer neighbours with edge replication; skimage samples the diagonals with
    # bilinear interpolation instead, a refinement the coarse 10-bin histogram does not need.
    padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge").astype(np.int16)
    height, width = rgb.shape[:2]
    centre = padded[1:-1, 1:-1]
    codes = np.zeros(rgb.shape, dtype=np.int64)
    offsets = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))
    for bit, (dy, dx) in enumerate(offsets):
        neighbour = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        codes |= (neighbour >= centre).astype(np.int64) << bit
    return colour, codes * TEXTURE_BINS // _LBP_CODES


def _region_features(
    labels: np.ndarray, colour_bins: np.ndarray, texture_bins: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-region sizes, boxes, colour and texture histograms, and adjacent label pairs."""
    height, width = labels.shape
    # Segmenters usually number regions 0..n-1 already; relabel so that bincount sizes are exact.
    unique, flat = np.unique(labels.ravel(), return_inverse=True)
    n = len(unique)
    flat = flat.astype(np.int64, copy=False)
    labels = flat.reshape(height, width)

    sizes = np.bincount(flat, minlength=n).astype(np.float64)

    # ufunc.at takes its fast path only when values and target share a dtype and are contiguous.
    rows = np.repeat(np.arange(height, dtype=np.float64), width)
    cols = np.tile(np.arange(width, dtype=np.float64), height)
    x1, y1 = np.full(n, float(width)), np.full(n, float(height))
    x2, y2 = np.zeros(n), np.zeros(n)
    np.minimum.at(x1, flat, cols)
    np.minimum.at(y1, flat, rows)
    np.maximum.at(x2, flat, cols + 1.0)  # exclusive max edge
    np.maximum.at(y2, flat, rows + 1.0)
    boxes = np.stack([x1, y1, x2, y2], axis=1)

    def histograms(bins: np.ndarray, n_bins: int) -> np.ndarray:
        # One bincount over (region, channel, bin) codes for all three channels at once.
        codes = (flat[:, None] * 3 + np.arange(3)) * n_bins + bins.reshape(-1, 3)
        counts = np.bincount(codes.ravel(), minlength=n * 3 * n_bins).reshape(n, 3 * n_bins)
        # Each channel holds `size` counts, so 3 * size L1-normalises the whole vector.
        return counts / (3.0 * sizes[:, None])

    colour = histograms(colour_bins, COLOUR_BINS)
    texture = histograms(texture_bins, TEXTURE_BINS)

    horizontal = np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], axis=1)
    vertical = np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], axis=1)
    pairs = np.concatenate([horizontal, vertical])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs.sort(axis=1)
    pairs = np.unique(pairs[:, 0] * n + pairs[:, 1])
    pairs = np.stack([pairs // n, pairs % n], axis=1)
    return sizes, boxes, colour, texture, pairs


def _hierarchical_grouping(
    sizes: np.ndarray,
    boxes: np.ndarray,
    colour: np.ndarray,
    texture: np.ndarray,
    pairs: np.ndarray,
    image_size: float,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
) -> np.ndarray:
    """Greedily merge the most similar adjacent regions; return the boxes of every region formed.

    `weights` scale the colour, texture, size and fill similarities (all 1 in the release).
    """
    colour_weight, texture_weight, size_weight, fill_weight = (float(w) for w in weights)
    n = len(sizes)
    capacity = 2 * n - 1  # n leaves and at most n - 1 merges
    all_sizes = np.zeros(capacity)
    all_boxes = np.zeros((capacity, 4))
    # Histogram intersection distributes over concatenation and non-negative scaling, so one
    # weighted vector gives colour_weight * colour_sim + texture_weight * texture_sim in one pass.
    all_hists = np.zeros((capacity, colour.shape[1] + texture.shape[1]))
    all_sizes[:n], all_boxes[:n] = sizes, boxes
    all_hists[:n] = np.concatenate([colour * colour_weight, texture * texture_weight], axis=1)
    alive = [True] * n + [False] * (capacity - n)

    def similarity(a: int | np.ndarray, b: np.ndarray) -> np.ndarray:
        # Called once per merge on a handful of neighbours, so it avoids numpy's slower wrappers.
        hist_sim = np.add.reduce(np.minimum(all_hists[a], all_hists[b]), axis=-1)
        size_ab = all_sizes[a] + all_sizes[b]
        box_a, box_b = all_boxes[a], all_boxes[b]
        union_lo = np.minimum(box_a[..., :2], box_b[..., :2])
        union_hi = np.maximum(box_a[..., 2:], box_b[..., 2:])
        extent = union_hi - union_lo
        union_area = extent[..., 0] * extent[..., 1]
        size_sim = 1.0 - size_ab / image_size
        fill_sim = 1.0 - (union_area - size_ab) / image_size
        return hist_sim + size_weight * size_sim + fill_weight * fill_sim

    neighbours: list[set[int]] = [set() for _ in range(capacity)]
    for a, b in pairs.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)

    # Max-heap through negated similarity; ties resolve on region ids, which keeps runs deterministic.
    heap: list[tuple[float, int, int]] = []
    if len(pairs):
        sims = similarity(pairs[:, 0], pairs[:, 1])
        heap = list(zip((-sims).tolist(), pairs[:, 0].tolist(), pairs[:, 1].tolist()))
        heapq.heapify(heap)

    next_id = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):
            continue  # a stale pair: one side was already merged into a larger region
        new = next_id
        next_id += 1
        size_a, size_b = all_sizes[a], all_sizes[b]
        all_sizes[new] = size_a + size_b
        all_boxes[new, :2] = np.minimum(all_boxes[a, :2], all_boxes[b, :2])
        all_boxes[new, 2:] = np.maximum(all_boxes[a, 2:], all_boxes[b, 2:])
        all_hists[new] = (all_hists[a] * size_a + all_hists[b] * size_b) / (size_a + size_b)
        alive[a] = alive[b] = False
        alive[new] = True
        merged_neighbours = (neighbours[a] | neighbours[b]) - {a, b}
        neighbours[a] = neighbours[b] = set()
        for c in merged_neighbours:
            neighbours[c] -= {a, b}
            neighbours[c].add(new)
        neighbours[new] = merged_neighbours
        if merged_neighbours:
            others = sorted(merged_neighbours)
            sims = similarity(new, np.array(others))
            for sim, c in zip((-sims).tolist(), others):
                heapq.heappush(heap, (sim, c, new))
    return all_boxes[:next_id]


def repaired_selective_search_boxes(
    rgb: np.ndarray, scale: float = 300.0, sigma: float = 0.9, min_size: int = 100
) -> np.ndarray:
    """The paper's selective search with repaired histograms and touching neighbours (skimage's Felzenszwalb, full resolution)."""
    rgb = _as_rgb_uint8(rgb)
    height, width = rgb.shape[:2]
    if height < 2 or width < 2:
        return _whole_image(width, height)
    labels = felzenszwalb(rgb, scale, sigma, min_size)  # scikit-image's label map, compiled
    features = _region_features(labels, *_repaired_pixel_bins(rgb))
    boxes = _hierarchical_grouping(*features, image_size=float(height * width))
    return boxes.astype(np.float32)


def _whole_image(width: int, height: int) -> np.ndarray:
    """The whole-image box, or no box for an empty image."""
    if width <= 0 or height <= 0:
        return np.zeros((0, 4), dtype=np.float32)
    return np.array([[0.0, 0.0, float(width), float(height)]], dtype=np.float32)


def _downscale(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink the image so that its longer side is at most max_side (never enlarge it)."""
    import cv2

    height, width = rgb.shape[:2]
    factor = max_side / max(height, width)
    if factor >= 1.0:
        return rgb
    new_w = max(2, round(width * factor))
    new_h = max(2, round(height * factor))
    # Area averaging is the anti-aliased choice for shrinking, and it is deterministic.
    return cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)


# Uijlings et al.'s diversification by similarity: colour+texture+size+fill, then each of colour and
# texture dropped, then size+fill alone. Each weighting yields a different hierarchy from one segmentation.
RICH_SIMILARITIES = ((1.0, 1.0, 1.0, 1.0), (0.0, 1.0, 1.0, 1.0), (1.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0))


def rich_selective_search_boxes(
    rgb: np.ndarray,
    max_side: int = 160,
    ks: Sequence[float] = (100.0,),
    sigma: float = 0.0,
    min_size: int = 30,
    similarities: Sequence[Sequence[float]] = RICH_SIMILARITIES,
) -> np.ndarray:
    """Selective search on a downscaled copy, pooled over thresholds ks and similarity weightings."""
    import cv2

    rgb = _as_rgb_uint8(rgb)
    height, width = rgb.shape[:2]
    if height < 2 or width < 2:
        return _whole_image(width, height)
    previous_threads = cv2.getNumThreads()
    # One thread: callers parallelise over images, and per-core throughput is what the benchmark reports.
    cv2.setNumThreads(1)
    try:
        small = _downscale(rgb, max_side)
        small_h, small_w = small.shape[:2]
        colour_bins, texture_bins = _rich_pixel_bins(small)
        results = []
        for k in ks:
            # OpenCV's C++ Felzenszwalb works on 0..255 pixels, so its k is on the scale of skimage's
            # `scale`. Area downscaling already averages many pixels into one, hence the default sigma=0
            # (no further blur, which would only soften the few edges left).
            segmenter = cv2.ximgproc.segmentation.createGraphSegmentation(
                sigma=float(sigma), k=float(k), min_size=int(min_size)
            )
            labels = segmenter.processImage(small)
            features = _region_features(labels, colour_bins, texture_bins)
            for weights in similarities:
                boxes = _hierarchical_grouping(
                    *features, image_size=float(small_h * small_w), weights=tuple(weights)
                )
                results.append(boxes)
    finally:
        cv2.setNumThreads(previous_threads)
    boxes = _to_original_pixels(np.concatenate(results), small_w, small_h, width, height)
    # Pooled hierarchies share many regions (the whole image at least); keeping one copy is lossless.
    return deduplicate_boxes(boxes)


# The `selectivesearch` package computes its colour histograms on skimage's HSV of an image scaled
# 0..255: hue and saturation lie in [0, 1] but are binned over [0, 255], so both always fill the first
# bin (a constant 2 in every colour similarity) and only the value, max(R, G, B), is binned for real.
_VALUE_BIN_EDGES = np.linspace(0.0, 255.0, COLOUR_BINS + 1)  # np.histogram's edges for range (0, 255)
_VALUE_BIN = np.minimum(np.searchsorted(_VALUE_BIN_EDGES, np.arange(256), side="right") - 1, COLOUR_BINS - 1)
# Its texture histograms bin LBP codes 0..255 over [0, 1]: only code 0 (all eight neighbours darker)
# and code 1 (only the right-hand neighbour as bright or brighter) are counted, per channel.
_PACKAGE_TEXTURE_CODES = 2
# SoCo's release changed that one line (selective_search/selective_search.py, line 140) to bin the codes over
# (0, 255): 10 bins of 25.5 codes, the last one closed. np.histogram itself gives each code's bin.
_RELEASE_TEXTURE_BIN = np.array([np.histogram([code], TEXTURE_BINS, (0.0, 255.0))[0].argmax()
                                 for code in range(_LBP_CODES)], dtype=np.int8)
# The package's: codes 0 and 1 are their own bins, every other code is not counted (-1).
_PACKAGE_TEXTURE_BIN = np.array([code if code < _PACKAGE_TEXTURE_CODES else -1 for code in range(_LBP_CODES)],
                                dtype=np.int8)
TEXTURE_RANGES = ("package", "release")
# skimage's LBP samples its 8 neighbours at these (row, column) offsets (rounded to 5 decimals, as it
# does), bilinearly interpolated, with 0 outside the image; neighbour 0 is the right-hand one. The
# compiled loops below read these tables (and _VALUE_BIN) as constants.
_LBP_ANGLES = 2 * np.pi * np.arange(8) / 8
_LBP_ROW_OFFSETS = np.round(-np.sin(_LBP_ANGLES), 5)
_LBP_COLUMN_OFFSETS = np.round(np.cos(_LBP_ANGLES), 5)
# The grouping keeps an (n, n) similarity matrix; the segmentation is coarsened until n fits.
MAX_FAST_REGIONS = 4096


@numba.njit(cache=True, nogil=True)
def _pixel_or_zero(channel: np.ndarray, row: int, column: int) -> float:
    """A pixel as float, 0 outside the image (skimage's LBP pads with the constant 0)."""
    if row < 0 or column < 0 or row >= channel.shape[0] or column >= channel.shape[1]:
        return 0.0
    return float(channel[row, column])


@numba.njit(cache=True, nogil=True)
def _bilinear(channel: np.ndarray, row: float, column: float) -> float:
    """skimage's bilinear sample at (row, column), in its order of operations (the >= test is exact)."""
    top_row, bottom_row = int(np.floor(row)), int(np.ceil(row))
    left, right = int(np.floor(column)), int(np.ceil(column))
    down, across = row - top_row, column - left
    top = (1 - across) * _pixel_or_zero(channel, top_row, left) + across * _pixel_or_zero(channel, top_row, right)
    bottom = (1 - across) * _pixel_or_zero(channel, bottom_row, left) + across * _pixel_or_zero(
        channel, bottom_row, right
    )
    return (1 - down) * top + down * bottom


@numba.njit(cache=True, nogil=True)
def _lbp_code(channel: np.ndarray, row: int, column: int) -> int:
    """skimage's LBP code (P=8, R=1, 'default') of any pixel, borders included: bit p set where neighbour p >= the centre."""
    centre = float(channel[row, column])
    code = 0
    for neighbour in range(8):
        value = _bilinear(channel, row + _LBP_ROW_OFFSETS[neighbour], column + _LBP_COLUMN_OFFSETS[neighbour])
        if value - centre >= 0:
            code |= 1 << neighbour
    return code


@numba.njit(cache=True, nogil=True)
def _lbp_codes(channel: np.ndarray) -> np.ndarray:
    """skimage's LBP codes (P=8, R=1, 'default') of a channel, equal to the bit.

    Inside the image the whole-pixel neighbours (right, up, left, down) are read directly, which is what
    skimage's interpolation returns for them, and a diagonal neighbour's interpolation weights depend only on
    its row (or column), so they are computed once per row and column in skimage's order of operations.
    """
    height, width = channel.shape
    codes = np.empty((height, width), np.uint8)
    for row in range(height):
        for column in range(width):
            if row == 0 or column == 0 or row == height - 1 or column == width - 1:
                codes[row, column] = _lbp_code(channel, row, column)
    if height < 3 or width < 3:
        return codes
    # Per diagonal neighbour (1, 3, 5, 7): its upper row and left column relative to the pixel, and the
    # fractions down and across of every row and column, as skimage's bilinear sample computes them.
    down = np.empty((4, height))
    across = np.empty((4, width))
    upper = np.empty(4, np.int64)
    left = np.empty(4, np.int64)
    for i in range(4):
        neighbour = 2 * i + 1
        row_offset, column_offset = _LBP_ROW_OFFSETS[neighbour], _LBP_COLUMN_OFFSETS[neighbour]
        upper[i] = -1 if row_offset < 0 else 0
        left[i] = -1 if column_offset < 0 else 0
        for row in range(height):
            down[i, row] = (row + row_offset) - (row + upper[i])
        for column in range(width):
            across[i, column] = (column + column_offset) - (column + left[i])
    # Row by row, all eight neighbours of a pixel in one pass over the row's columns without a branch, so that
    # the compiler vectorises the loop (the same comparisons in the same arithmetic; twice as fast as a pass per
    # neighbour over the row). Diagonal 1 (up-right) interpolates rows above/centre at columns c, c + 1; 3 (up-left)
    # above/centre at c - 1, c; 5 (down-left) centre/below at c - 1, c; 7 (down-right) centre/below at c, c + 1.
    across1, across3, across5, across7 = across[0], across[1], across[2], across[3]
    values = channel.astype(np.float64)
    for row in range(1, height - 1):
        above, centre, below = values[row - 1], values[row], values[row + 1]
        down1, down3, down5, down7 = down[0, row], down[1, row], down[2, row], down[3, row]
        out = codes[row]
        for column in range(1, width - 1):
            value = centre[column]
            code = ((centre[column + 1] >= value) * 1 + (above[column] >= value) * 4
                    + (centre[column - 1] >= value) * 16 + (below[column] >= value) * 64)
            a = across1[column]
            top = (1 - a) * above[column] + a * above[column + 1]
            bottom = (1 - a) * centre[column] + a * centre[column + 1]
            code += ((1 - down1) * top + down1 * bottom - value >= 0) * 2
            a = across3[column]
            top = (1 - a) * above[column - 1] + a * above[column]
            bottom = (1 - a) * centre[column - 1] + a * centre[column]
            code += ((1 - down3) * top + down3 * bottom - value >= 0) * 8
            a = across5[column]
            top = (1 - a) * centre[column - 1] + a * centre[column]
            bottom = (1 - a) * below[column - 1] + a * below[column]
            code += ((1 - down5) * top + down5 * bottom - value >= 0) * 32
            a = across7[column]
            top = (1 - a) * centre[column] + a * centre[column + 1]
            bottom = (1 - a) * below[column] + a * below[column + 1]
            code += ((1 - down7) * top + down7 * bottom - value >= 0) * 128
            out[column] = code
    return codes


@numba.njit(cache=True, nogil=True)
def _texture_bins(planes: np.ndarray, release: bool) -> np.ndarray:
    """(C, H, W) int8 texture bin of every pixel and channel, -1 where the histogram does not count it.

    The package's: the LBP code itself where it is 0 or 1 (its (0, 1) range). The release's: the code's bin of
    10 over (0, 255).
    """
    table = _RELEASE_TEXTURE_BIN if release else _PACKAGE_TEXTURE_BIN
    channels, height, width = planes.shape
    bins = np.empty((channels, height, width), np.int8)
    for channel in range(channels):
        codes = _lbp_codes(planes[channel])
        for row in range(height):
            for column in range(width):
                bins[channel, row, column] = table[codes[row, column]]
    return bins


@numba.njit(cache=True, nogil=True)
def _package_feature_sums(
    labels: np.ndarray, planes: np.ndarray, texture_bins: np.ndarray, n_texture_bins: int, n_regions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per region: pixel count, inclusive box, and counts of value bins then of texture bins per channel."""
    height, width = labels.shape
    sizes = np.zeros(n_regions)
    boxes = np.empty((n_regions, 4))
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = width, height, 0.0, 0.0
    counts = np.zeros((n_regions, COLOUR_BINS + planes.shape[0] * n_texture_bins))
    for row in range(height):
        for column in range(width):
            region = labels[row, column]
            sizes[region] += 1
            boxes[region, 0] = min(boxes[region, 0], column)
            boxes[region, 1] = min(boxes[region, 1], row)
            boxes[region, 2] = max(boxes[region, 2], column)
            boxes[region, 3] = max(boxes[region, 3], row)
            brightest = max(planes[0, row, column], planes[1, row, column], planes[2, row, column])
            counts[region, _VALUE_BIN[brightest]] += 1
    for channel in range(planes.shape[0]):
        for row in range(height):
            for column in range(width):
                texture_bin = texture_bins[channel, row, column]
                if texture_bin >= 0:
                    counts[labels[row, column], COLOUR_BINS + channel * n_texture_bins + texture_bin] += 1
    return sizes, boxes, counts


def _package_region_features(
    labels: np.ndarray, rgb: np.ndarray, texture_range: str = "package"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sizes, inclusive boxes, histograms and neighbour pairs of the package, regions in its order.

    The package numbers regions in the order a raster scan first meets them (scikit-image's labels),
    and its neighbour test depends on that order, so ``labels`` must be numbered that way. Colour: 25
    bins of max(R, G, B); texture, per channel: the pixels of LBP code 0 and 1 (``texture_range``
    "package", its (0, 1) range) or of each of 10 bins of the codes over (0, 255) ("release", SoCo's
    release's line 140); skimage's LBP codes, equal to the bit. All are divided by the region's pixel
    count, as the package does.
    """
    if texture_range not in TEXTURE_RANGES:
        raise ConfigError(f"texture_range must be one of {', '.join(TEXTURE_RANGES)}, not {texture_range!r}")
    release = texture_range == "release"
    planes = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    n_regions = int(labels.max()) + 1
    sizes, boxes, counts = _package_feature_sums(
        np.ascontiguousarray(labels, dtype=np.int32), planes, _texture_bins(planes, release),
        TEXTURE_BINS if release else _PACKAGE_TEXTURE_CODES, n_regions,
    )
    return sizes, boxes, counts / sizes[:, None], _corner_inside_pairs(boxes)


def _corner_inside_pairs(boxes: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Pairs (a, b), a < b, where a corner of box b lies strictly inside box a (the package's neighbours).

    Only b's corners are tested, as in the package, so the relation depends on the region order.
    """
    x1, y1, x2, y2 = boxes.T
    found = []
    for start in range(0, len(boxes), chunk):
        a = np.arange(start, min(start + chunk, len(boxes)))[:, None]
        inside_x1 = (x1[a] < x1) & (x1 < x2[a])
        inside_x2 = (x1[a] < x2) & (x2 < x2[a])
        inside_y1 = (y1[a] < y1) & (y1 < y2[a])
        inside_y2 = (y1[a] < y2) & (y2 < y2[a])
        corner = (inside_x1 & inside_y1) | (inside_x2 & inside_y2)
        corner |= (inside_x1 & inside_y2) | (inside_x2 & inside_y1)
        corner &= np.arange(len(boxes)) > a
        rows, cols = np.nonzero(corner)
        found.append(np.stack([rows + start, cols], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


@numba.njit(cache=True, nogil=True)
def _row_sum(values: np.ndarray) -> float:
    """A row's sum in numpy's order (eight running sums, then the rest), so that ties break as numpy's would."""
    n = values.size
    if n < 8:
        total = 0.0
        for i in range(n):
            total += values[i]
        return total
    partial = values[:8].copy()
    i = 8
    while i < n - n % 8:
        for j in range(8):
            partial[j] += values[i + j]
        i += 8
    total = (partial[0] + partial[1]) + (partial[2] + partial[3])
    total = total + ((partial[4] + partial[5]) + (partial[6] + partial[7]))
    while i < n:
        total += values[i]
        i += 1
    return total


@numba.njit(cache=True, nogil=True)
def _package_similarity(
    a: int, b: int, sizes: np.ndarray, boxes: np.ndarray, hists: np.ndarray, image_size: float, scratch: np.ndarray
) -> float:
    """Histogram intersection + size + fill of regions a and b (inclusive boxes, as the package's)."""
    for j in range(hists.shape[1]):
        scratch[j] = min(hists[a, j], hists[b, j])
    size_ab = sizes[a] + sizes[b]
    extent_x = max(boxes[a, 2], boxes[b, 2]) - min(boxes[a, 0], boxes[b, 0])
    extent_y = max(boxes[a, 3], boxes[b, 3]) - min(boxes[a, 1], boxes[b, 1])
    return _row_sum(scratch) + (1.0 - size_ab / image_size) + (1.0 - (extent_x * extent_y - size_ab) / image_size)


@numba.njit(cache=True, nogil=True)
def _package_grouping_loop(
    sizes: np.ndarray, boxes: np.ndarray, hists: np.ndarray, pairs: np.ndarray, image_size: float
) -> np.ndarray:
    """The merges of ``_package_grouping`` (inputs are copied, not changed)."""
    n = sizes.size
    leaves = boxes
    sizes, boxes, hists = sizes.copy(), boxes.copy(), hists.copy()
    scratch = np.empty(hists.shape[1])
    sim = np.full((n, n), -np.inf)
    for k in range(pairs.shape[0]):
        a, b = pairs[k, 0], pairs[k, 1]
        sim[a, b] = sim[b, a] = _package_similarity(a, b, sizes, boxes, hists, image_size, scratch)
    best = np.empty(n, np.int64)
    bound = np.empty(n)
    for row in range(n):
        best[row] = np.argmax(sim[row])
        bound[row] = sim[row, best[row]]
    stale = np.zeros(n, np.bool_)
    merged = np.empty((n, 4))
    n_merged = 0
    others = np.empty(n, np.int64)
    while True:
        row = np.argmax(bound)
        if bound[row] == -np.inf:
            break
        if stale[row]:
            best[row] = np.argmax(sim[row])
            bound[row] = sim[row, best[row]]
            stale[row] = False
            continue
        a, b = min(row, best[row]), max(row, best[row])  # the merged region takes the lower slot
        size_a, size_b = sizes[a], sizes[b]
        sizes[a] = size_a + size_b
        boxes[a, 0], boxes[a, 1] = min(boxes[a, 0], boxes[b, 0]), min(boxes[a, 1], boxes[b, 1])
        boxes[a, 2], boxes[a, 3] = max(boxes[a, 2], boxes[b, 2]), max(boxes[a, 3], boxes[b, 3])
        for j in range(hists.shape[1]):
            hists[a, j] = (hists[a, j] * size_a + hists[b, j] * size_b) / sizes[a]
        merged[n_merged] = boxes[a]
        n_merged += 1

        n_others = 0
        for k in range(n):
            if k != a and k != b and max(sim[a, k], sim[b, k]) > -np.inf:
                others[n_others] = k
                n_others += 1
        for k in range(n):
            sim[a, k] = sim[b, k] = sim[k, a] = sim[k, b] = -np.inf
        bound[a] = bound[b] = -np.inf
        stale[a] = stale[b] = False
        if n_others == 0:
            continue
        top = -np.inf
        for i in range(n_others):
            k = others[i]
            value = _package_similarity(a, k, sizes, boxes, hists, image_size, scratch)
            sim[a, k] = sim[k, a] = value
            if value > top:
                top, best[a] = value, k
            # k's row lost its entries for a and b and gained the new one. If the new value is at least
            # its old bound it is the row's exact maximum; else the old bound still bounds the row,
            # exact only if the row's best partner was neither a nor b.
            lost_best = stale[k] or best[k] == a or best[k] == b
            new_is_max = value >= bound[k]
            if new_is_max:
                best[k] = a
            bound[k] = max(bound[k], value)
            stale[k] = lost_best and not new_is_max
        bound[a] = top
    out = np.empty((n + n_merged, 4))
    out[:n] = leaves
    out[n:] = merged[:n_merged]
    return out


def _package_grouping(
    sizes: np.ndarray, boxes: np.ndarray, hists: np.ndarray, pairs: np.ndarray, image_size: float
) -> np.ndarray:
    """The package's greedy grouping: merge the most similar neighbour pair until no pair is left.

    Returns the inclusive boxes of the regions, then of every merge in order. Similarity is histogram
    intersection + size + fill (the package's constant 2 of hue and saturation left out). The (n, n)
    matrix holds the current similarities (-inf between non-neighbours); each row keeps an upper bound
    of its maximum, exact unless marked stale, so that a merge touching hundreds of neighbours updates
    each of them once instead of searching their rows again.
    """
    boxes = np.ascontiguousarray(boxes, dtype=np.float64)
    if len(sizes) < 2 or len(pairs) == 0:
        return boxes.copy()
    return _package_grouping_loop(
        np.ascontiguousarray(sizes, dtype=np.float64),
        boxes,
        np.ascontiguousarray(hists, dtype=np.float64),
        np.ascontiguousarray(pairs, dtype=np.int64).reshape(-1, 2),
        float(image_size),
    )


def _segment(rgb: np.ndarray, scale: float, sigma: float, min_size: int) -> np.ndarray:
    """scikit-image's Felzenszwalb labels, coarsened (min_size doubled) until there are few enough regions."""
    while True:
        labels = felzenszwalb(rgb, scale, sigma, min_size)
        if int(labels.max()) + 1 <= MAX_FAST_REGIONS:
            return labels
        min_size *= 2  # only noise-like images get here: thousands of regions of a few pixels


def _package_boxes(
    rgb: np.ndarray, max_side: int, scale: float, sigma: float, min_size: int, texture_range: str
) -> tuple[np.ndarray, int, int]:
    """(inclusive boxes of every region and merge in the package's order, shrunk width, shrunk height)."""
    import cv2

    height, width = rgb.shape[:2]
    previous_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # callers parallelise over images; the benchmark reports per-core rates
    try:
        small = _downscale(rgb, max_side)
        small_h, small_w = small.shape[:2]
        area_factor = (small_h * small_w) / (height * width)
        labels = _segment(small, float(scale), float(sigma), max(1, round(min_size * area_factor)))
    finally:
        cv2.setNumThreads(previous_threads)
    features = _package_region_features(labels, small, texture_range)
    return _package_grouping(*features, image_size=float(small_h * small_w)), small_w, small_h


def release_selective_search_boxes(
    rgb: np.ndarray, max_side: int = 1024, scale: float = 300.0, sigma: float = 0.9, min_size: int = 100
) -> np.ndarray:
    """SoCo's release's selective search, box for box: its rects as boxes, in its order, duplicates kept.

    The release (hologerry/SoCo) calls its copy of the ``selectivesearch`` package with scale=300,
    sigma=0.9, min_size=100 on the full image (``selective_search/generate_imagenet_ss_proposals.py``,
    lines 22-23 and 47); the copy differs from the package in one line that changes results, the LBP
    texture histogram binned over (0, 255) (``selective_search/selective_search.py``, line 140). Everything
    else is the package's, quirks included (see ``package_selective_search_boxes``). A box is the rect
    ``(x, y, x + w, y + h)`` with the release's ``w = max - min``, so it ends at the region's last column
    and SoCo's filter sees the release's widths; the list holds a rect twice where a merge has the box of
    one of its parts, as the release's does, since its views sample proposals_per_image of them without
    replacement.
    Images with a side over ``max_side`` are shrunk first (min_size with the area), where the release
    would take minutes to hours; ImageNet-sized images never are.
    """
    rgb = _as_rgb_uint8(rgb)
    height, width = rgb.shape[:2]
    if height < 2 or width < 2:
        return _whole_image(width, height)
    boxes, small_w, small_h = _package_boxes(rgb, max_side, scale, sigma, min_size, "release")
    # Inclusive max -> exclusive edge for the mapping to the original pixels, then back to the release's end.
    boxes = _to_original_pixels(boxes + np.array([0.0, 0.0, 1.0, 1.0]), small_w, small_h, width, height)
    return boxes - np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)


def package_selective_search_boxes(
    rgb: np.ndarray, max_side: int = 1024, scale: float = 500.0, sigma: float = 0.9, min_size: int = 10
) -> np.ndarray:
    """The ``selectivesearch`` package 0.4's selective search as released, box for box, in compiled loops.

    soco's default before ``release`` (then named ``fast``), at the parameters it used. The package segments
    with scikit-image's Felzenszwalb (``scale``, ``sigma``, ``min_size``), then merges greedily with its own
    semantics, quirks included, because they decide which regions form: similarity is the intersection of
    value histograms (25 bins of max(R, G, B)) and of LBP code-0/code-1 counts, plus size and fill;
    neighbours are regions with a bounding-box corner strictly inside an earlier region's box (raster
    order), whether or not they touch; pairs are merged until none is left (regions without neighbours
    never merge, so the last box need not be the whole image). Here the segmentation equals scikit-image's
    label for label (``felzenszwalb.py``) and the histograms equal the package's, so the boxes are the
    package's up to ties in the merge order, with an exclusive max edge (one pixel past the package's
    ``max - min``) and duplicates dropped. Images with a side over ``max_side`` are first shrunk to it
    (min_size with the area): the package itself takes hours on a 3-megapixel photo, and here the time per
    pixel grows with the size (random access over the pixels; 0.6 s a photo at 1024 px, 4 s at 1536 px).
    """
    rgb = _as_rgb_uint8(rgb)
    height, width = rgb.shape[:2]
    if height < 2 or width < 2:
        return _whole_image(width, height)
    boxes, small_w, small_h = _package_boxes(rgb, max_side, scale, sigma, min_size, "package")
    boxes = boxes + np.array([0.0, 0.0, 1.0, 1.0])  # inclusive max -> exclusive edge
    return deduplicate_boxes(_to_original_pixels(boxes, small_w, small_h, width, height))


def _to_original_pixels(boxes: np.ndarray, small_w: int, small_h: int, width: int, height: int) -> np.ndarray:
    """Boxes with exclusive edges in the shrunk copy's pixels -> whole original pixels, float32."""
    # Column c of the small image covers [c * sx, (c + 1) * sx) of the original, so exclusive edges
    # scale exactly; rounding gives whole original pixels.
    sx, sy = width / small_w, height / small_h
    boxes = np.round(boxes * np.array([sx, sy, sx, sy]))
    boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], dtype=np.float64))
    return boxes.astype(np.float32)


@dataclass(frozen=True)
class ProposalAlgorithm:
    """A named selective-search variant with its parameters (recorded in the proposal store)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Return the raw (N, 4) float32 x1 y1 x2 y2 proposal boxes of an RGB uint8 image."""
        if self.name not in _FUNCTIONS:
            raise ConfigError(_unknown_message(self.name))
        return _FUNCTIONS[self.name](rgb, **self.params)

    @property
    def fingerprint(self) -> str:
        """Short digest of the name and parameters: what a cache of proposals must be keyed by."""
        settings = json.dumps({"name": self.name, "params": self.params}, sort_keys=True)
        return hashlib.blake2b(settings.encode(), digest_size=6).hexdigest()


# "release" first: the default. "package" was the default before it (then named "fast"), "rich" the one before that.
ALGORITHM_NAMES = ("release", "package", "rich", "repaired")
DEFAULT_ALGORITHM = "release"
# Names of earlier soco versions; a store or configuration that uses one is pointed to the new name.
RENAMED_ALGORITHMS = {"fast": "package", "reference": "repaired"}

_FUNCTIONS = {
    "release": release_selective_search_boxes,
    "package": package_selective_search_boxes,
    "rich": rich_selective_search_boxes,
    "repaired": repaired_selective_search_boxes,
}

_PARAMS: dict[str, dict[str, Any]] = {
    "release": {"max_side": 1024, "scale": 300.0, "sigma": 0.9, "min_size": 100},
    "package": {"max_side": 1024, "scale": 500.0, "sigma": 0.9, "min_size": 10},
    "rich": {
        "max_side": 160,
        "ks": [100.0],
        "sigma": 0.0,
        "min_size": 30,
        "similarities": [list(weights) for weights in RICH_SIMILARITIES],
    },
    "repaired": {"scale": 300.0, "sigma": 0.9, "min_size": 100},
}


def _unknown_message(name: str) -> str:
    """Error text for an unknown algorithm name, with the valid names and the closest one."""
    if name in RENAMED_ALGORITHMS:
        return (f"proposal algorithm {name!r} is now named {RENAMED_ALGORITHMS[name]!r} (the default is now "
                f"{DEFAULT_ALGORITHM!r}, SoCo's release's selective search); valid: {', '.join(ALGORITHM_NAMES)}")
    message = f"unknown proposal algorithm {name!r}; valid: {', '.join(ALGORITHM_NAMES)}"
    close = difflib.get_close_matches(str(name), ALGORITHM_NAMES, n=1, cutoff=0.0)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message


def get_algorithm(name: str) -> ProposalAlgorithm:
    """Return the proposal algorithm of that name (ConfigError if there is none)."""
    if name not in _PARAMS:
        raise ConfigError(_unknown_message(name))
    # A copy, so that a caller editing params cannot change the module's defaults.
    return ProposalAlgorithm(name=name, params=copy.deepcopy(_PARAMS[name]))
