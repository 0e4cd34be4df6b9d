"""Selective search (Uijlings et al.) that turns an RGB image into raw, unfiltered proposal boxes.

Two algorithms share one implementation of the hierarchical grouping:

* ``reference``: the algorithm of SoCo's release, at the image's original resolution: Felzenszwalb
  segmentation (scale=300, sigma=0.9, min_size=100), HSV colour histograms (25 bins per channel),
  LBP texture histograms (10 bins per channel), similarity = colour + texture + size + fill, greedy
  merging of the most similar adjacent pair until one region is left; every region yields a box.
* ``fast`` (the default): the same grouping on a copy of the image shrunk to at most ``max_side``
  (160) pixels, segmented by OpenCV's C++ Felzenszwalb, with cheaper pixel features (OpenCV HSV, a
  3x3 LBP) and four similarity weightings whose boxes are pooled (the "diversification" of Uijlings
  et al.). SoCo's filter keeps only boxes of at least 32 px and 0.3 * sqrt(W * H) relative scale, so
  the detail lost by shrinking seldom reaches a kept box. On the default photos it is about 25x
  (640 px photos) to 700x (3000 px photos) faster per core than ``reference``, and its kept boxes
  match about 98% of the reference's kept boxes at IoU >= 0.5 (see benchmarks/proposals.py).

Boxes are float32 ``(N, 4)`` arrays of ``x1 y1 x2 y2`` in original-image pixels with an exclusive
max edge (a region covering columns 3..10 gives ``x1 = 3, x2 = 11``), clipped to the image.

Differences from the classic pure-Python implementation, all deliberate:

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
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


def _reference_pixel_bins(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour and texture bin of every pixel and channel, as the release computes them (skimage)."""
    from skimage.color import rgb2hsv
    from skimage.feature import local_binary_pattern

    hsv = rgb2hsv(rgb)
    colour = np.minimum((hsv * COLOUR_BINS).astype(np.int64), COLOUR_BINS - 1)
    texture = np.stack(
        [local_binary_pattern(rgb[:, :, c], 8, 1.0).astype(np.int64) for c in range(3)], axis=2
    )
    return colour, texture * TEXTURE_BINS // _LBP_CODES


def _fast_pixel_bins(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def selective_search_boxes(
    rgb: np.ndarray, scale: float = 300.0, sigma: float = 0.9, min_size: int = 100
) -> np.ndarray:
    """Run the release's selective search (skimage Felzenszwalb, full resolution) on an RGB image."""
    from skimage.segmentation import felzenszwalb

    rgb = _as_rgb_uint8(rgb)
    height, width = rgb.shape[:2]
    if height < 2 or width < 2:
        return _whole_image(width, height)
    labels = felzenszwalb(
        rgb.astype(np.float64) / 255.0, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1
    )
    features = _region_features(labels, *_reference_pixel_bins(rgb))
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
FAST_SIMILARITIES = ((1.0, 1.0, 1.0, 1.0), (0.0, 1.0, 1.0, 1.0), (1.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0))


def fast_selective_search_boxes(
    rgb: np.ndarray,
    max_side: int = 160,
    ks: Sequence[float] = (100.0,),
    sigma: float = 0.0,
    min_size: int = 30,
    similarities: Sequence[Sequence[float]] = FAST_SIMILARITIES,
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
        colour_bins, texture_bins = _fast_pixel_bins(small)
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
    boxes = np.concatenate(results)
    # Column c of the small image covers [c * sx, (c + 1) * sx) of the original, so exclusive edges
    # scale exactly; rounding gives whole original pixels.
    sx, sy = width / small_w, height / small_h
    boxes = np.round(boxes * np.array([sx, sy, sx, sy]))
    boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], dtype=np.float64))
    # Pooled hierarchies share many regions (the whole image at least); keeping one copy is lossless.
    return deduplicate_boxes(boxes.astype(np.float32))


@dataclass(frozen=True)
class ProposalAlgorithm:
    """A named selective-search variant with its parameters (recorded in the proposal store)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """Return the raw (N, 4) float32 x1 y1 x2 y2 proposal boxes of an RGB uint8 image."""
        if self.name == "reference":
            return selective_search_boxes(rgb, **self.params)
        if self.name == "fast":
            return fast_selective_search_boxes(rgb, **self.params)
        raise ConfigError(_unknown_message(self.name))


ALGORITHM_NAMES = ("fast", "reference")
DEFAULT_ALGORITHM = "fast"

_PARAMS: dict[str, dict[str, Any]] = {
    "reference": {"scale": 300.0, "sigma": 0.9, "min_size": 100},
    "fast": {
        "max_side": 160,
        "ks": [100.0],
        "sigma": 0.0,
        "min_size": 30,
        "similarities": [list(weights) for weights in FAST_SIMILARITIES],
    },
}


def _unknown_message(name: str) -> str:
    """Error text for an unknown algorithm name, with the valid names and the closest one."""
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
