"""Felzenszwalb-Huttenlocher graph segmentation, label for label equal to scikit-image's, in compiled loops.

``felzenszwalb(rgb, scale, sigma, min_size)`` returns what
``skimage.segmentation.felzenszwalb(img_as_float(rgb), scale, sigma, min_size)`` returns: the same
regions, numbered the same way (in the order a raster scan first meets them), 5-10 times faster.
The ``selectivesearch`` package that SoCo's release copied starts from that segmentation, and its
boxes move with any change of it (benchmarks/results/proposals.md), so the `release` and `package` proposals reproduce it
instead of approximating it (the `repaired` proposals use it too). Steps, each as scikit-image does them:

* the image scaled to 0..1 in float64 and blurred per channel by a Gaussian of ``sigma`` (radius
  ``int(4 sigma + 0.5)``, borders mirrored as in ``scipy.ndimage``'s mode 'reflect');
* the 8-connected grid graph, an edge's cost being the Euclidean distance of its pixels' colours;
* edges in increasing cost, merging two components when the cost is below both components' internal
  cost plus ``scale / 255 / size`` (that bound rounded to float32, as scikit-image's Cython keeps it);
* then every edge again in the same order, merging any component smaller than ``min_size``.

Equal costs are taken in a fixed edge order here, where scikit-image uses numpy's unstable quicksort;
both orders give the same label maps on the default photos (tests/data/proposals/test_felzenszwalb.py).
"""

from __future__ import annotations

import cv2
import numba
import numpy as np

# Edge e joins pixel e >> 2 to the pixel at this offset (in flat pixels) for direction e & 3:
# right, down, down-right, down-left. The last is scikit-image's "up-right" edge seen from its upper pixel.
_RIGHT, _DOWN, _DOWN_RIGHT, _DOWN_LEFT = range(4)


def gaussian_planes(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """(C, H, W) float64 planes of rgb / 255 blurred as ``scipy.ndimage.gaussian_filter(mode='reflect')``."""
    image = rgb.astype(np.float64) / 255.0
    radius = int(4.0 * sigma + 0.5)
    if sigma > 0 and radius > 0:
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        kernel = np.exp(-0.5 / (sigma * sigma) * offsets * offsets)
        kernel /= kernel.sum()
        # BORDER_REFLECT repeats the edge pixel (d c b a | a b c d), which is scipy's 'reflect'.
        image = cv2.sepFilter2D(image, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(image.transpose(2, 0, 1))


@numba.njit(cache=True, nogil=True)
def _edge_costs(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Costs by edge id (pixel * 4 + direction), and the sort keys of the edges that exist.

    A key packs the float32 rounding of the cost (non-negative, so its bits sort as the value does)
    above the edge id, so that one integer sort orders the edges by cost and then by id.
    """
    channels, height, width = planes.shape
    costs = np.zeros(4 * height * width)
    for channel in range(channels):
        for y in range(height):
            row = planes[channel, y]
            base = 4 * y * width
            for x in range(width - 1):
                step = row[x + 1] - row[x]
                costs[base + 4 * x + _RIGHT] += step * step
            if y + 1 < height:
                below = planes[channel, y + 1]
                for x in range(width):
                    step = below[x] - row[x]
                    costs[base + 4 * x + _DOWN] += step * step
                for x in range(width - 1):
                    step = below[x + 1] - row[x]
                    costs[base + 4 * x + _DOWN_RIGHT] += step * step
                for x in range(1, width):
                    step = below[x - 1] - row[x]
                    costs[base + 4 * x + _DOWN_LEFT] += step * step
    keys = np.empty(4 * height * width, np.uint64)
    count = 0
    for y in range(height):
        for x in range(width):
            for direction in range(4):
                if direction != _RIGHT and y + 1 == height:
                    continue
                if (direction == _RIGHT or direction == _DOWN_RIGHT) and x + 1 == width:
                    continue
                if direction == _DOWN_LEFT and x == 0:
                    continue
                edge = 4 * (y * width + x) + direction
                cost = np.sqrt(costs[edge])
                costs[edge] = cost
                bits = np.uint64(np.float32(cost).view(np.uint32))
                keys[count] = (bits << np.uint64(32)) | np.uint64(edge)
                count += 1
    return costs, keys[:count]


@numba.njit(cache=True, nogil=True)
def _find_root(nodes: np.ndarray, node: int) -> int:
    """Root of node's component (``nodes[:, 0]`` holds the parents), halving the path on the way."""
    while nodes[node, 0] != node:
        nodes[node, 0] = nodes[nodes[node, 0], 0]
        node = nodes[node, 0]
    return node


@numba.njit(cache=True, nogil=True)
def _order_equal_keys(edges: np.ndarray, rounded: np.ndarray, costs: np.ndarray) -> None:
    """Within each run of equal float32 costs, put the edges in float64 cost order (stable), in place."""
    n_edges = edges.size
    start = 0
    while start < n_edges:
        stop = start + 1
        while stop < n_edges and rounded[stop] == rounded[start]:
            stop += 1
        for i in range(start + 1, stop):  # insertion sort: runs are short, or all equal (zero costs)
            edge, j = edges[i], i - 1
            while j >= start and costs[edges[j]] > costs[edge]:
                edges[j + 1] = edges[j]
                j -= 1
            edges[j + 1] = edge
        start = stop


@numba.njit(cache=True, nogil=True)
def _merge_components(
    edges: np.ndarray, rounded: np.ndarray, costs: np.ndarray, height: int, width: int, scale: float, min_size: int
) -> np.ndarray:
    """Labels (raster order of first pixel) from the edges in increasing cost.

    ``rounded`` holds the edges' costs rounded to float32. The merge test (cost < a float32 bound) is
    settled by the rounded cost unless it equals the bound, so the float64 cost, a random read, is
    fetched only then and for merges.
    """
    n_pixels = height * width
    n_edges = edges.size
    offsets = np.array([1, width, width + 1, width - 1])
    # One (parent, merge bound) record per pixel, so that the root lookups and the bound test of an edge read
    # one cache line per end instead of two; pass 1 is bound by these random reads. A root's float32 bound,
    # internal cost + scale / size, changes only when the root merges, so it is kept rather than divided anew
    # for both ends of every edge (the values are the same).
    nodes = np.empty((n_pixels, 2), np.int32)
    bounds = nodes.view(np.float32)  # column 1, as float32
    for pixel in range(n_pixels):
        nodes[pixel, 0] = pixel
        bounds[pixel, 1] = np.float32(scale)
    size = np.ones(n_pixels, np.int32)
    for i in range(n_edges):
        edge = edges[i]
        first = edge >> 2
        root0 = _find_root(nodes, first)
        root1 = _find_root(nodes, first + offsets[edge & 3])
        if root0 == root1:
            continue
        bound = min(bounds[root0, 1], bounds[root1, 1])
        if rounded[i] > bound or (rounded[i] == bound and not costs[edge] < np.float64(bound)):
            continue
        if size[root0] < size[root1]:
            root0, root1 = root1, root0
        nodes[root1, 0] = root0
        size[root0] += size[root1]
        bounds[root0, 1] = np.float32(costs[edge] + scale / size[root0])

    roots = np.empty(n_pixels, np.int32)
    any_small = False
    for pixel in range(n_pixels):
        roots[pixel] = _find_root(nodes, pixel)
        any_small = any_small or size[roots[pixel]] < min_size
    if any_small:
        for i in range(n_edges):
            first = edges[i] >> 2
            second = first + offsets[edges[i] & 3]
            # Sizes only grow: two components already at min_size never merge here.
            if size[roots[first]] >= min_size and size[roots[second]] >= min_size:
                continue
            root0, root1 = _find_root(nodes, first), _find_root(nodes, second)
            if root0 != root1 and (size[root0] < min_size or size[root1] < min_size):
                if size[root0] < size[root1]:
                    root0, root1 = root1, root0
                nodes[root1, 0] = root0
                size[root0] += size[root1]
        for pixel in range(n_pixels):
            roots[pixel] = _find_root(nodes, pixel)

    labels = np.empty(n_pixels, np.int32)
    label_of_root = np.full(n_pixels, -1, np.int32)
    count = 0
    for pixel in range(n_pixels):
        root = roots[pixel]
        if label_of_root[root] < 0:
            label_of_root[root] = count
            count += 1
        labels[pixel] = label_of_root[root]
    return labels.reshape(height, width)


def felzenszwalb(rgb: np.ndarray, scale: float = 1.0, sigma: float = 0.8, min_size: int = 20) -> np.ndarray:
    """int32 (H, W) region labels of an (H, W, C) uint8 image, as scikit-image's felzenszwalb gives them."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim not in (2, 3):
        raise ValueError(f"felzenszwalb needs an (H, W) or (H, W, C) uint8 image, got {rgb.dtype} {rgb.shape}")
    if rgb.ndim == 3 and rgb.shape[2] > 4:
        raise ValueError(f"felzenszwalb takes at most 4 channels, got {rgb.shape[2]}")
    height, width = rgb.shape[:2]
    if 4 * height * width >= 2**32:  # edge ids share a 64-bit sort key with the cost's 32 bits
        raise ValueError(f"felzenszwalb takes images under 2**30 pixels, got {height}x{width}")
    if height == 0 or width == 0:
        return np.zeros((height, width), dtype=np.int32)
    costs, keys = _edge_costs(gaussian_planes(rgb, float(sigma)))
    keys.sort()
    edges = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    rounded = (keys >> np.uint64(32)).astype(np.uint32).view(np.float32)
    _order_equal_keys(edges, rounded, costs)
    return _merge_components(edges, rounded, costs, height, width, float(scale) / 255.0, int(min_size))
