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
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

# Edge e joins pixel e >> 2 to the pixel at this offset (in flat pixels) for direction e & 3:
# right, down, down-right, down-left. The last is scikit-image's "up-right" edge seen from its upper pixel.
_RIGHT, _DOWN, _DOWN_RIGHT, _DOWN_LEFT = range(4)
PREFETCH_DISTANCE = 16


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
def _edge_costs(planes: np.ndarray, id_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(4, H * W) costs by direction and pixel, and the sort keys of all edges.

    A key packs the cost's leading float64 bits (non-negative, so its bits sort as the value does) above the
    ``id_bits`` of the edge id (pixel * 4 + direction), so that one integer sort orders the edges by cost
    and then by id, up to the cost bits cut off. Edges that do not exist (past the image's border) cost
    infinity, so that they sort last and are cut off. A key's cost bits are zero only for a zero cost: the
    smallest non-zero cost, the square root of the smallest float64, is about 2e-162, whose bits are above
    2**60, and at most 31 of them are cut.
    """
    channels, height, width = planes.shape
    n_pixels = height * width
    # Direction by direction into contiguous rows, channel by channel, so that the loops vectorise; the sum
    # over channels runs in channel order, as scikit-image's does.
    squares = np.zeros((4, height, width))
    for channel in range(channels):
        for y in range(height):
            row = planes[channel, y]
            out = squares[_RIGHT, y]
            for x in range(width - 1):
                step = row[x + 1] - row[x]
                out[x] += step * step
            if y + 1 < height:
                below = planes[channel, y + 1]
                out = squares[_DOWN, y]
                for x in range(width):
                    step = below[x] - row[x]
                    out[x] += step * step
                out = squares[_DOWN_RIGHT, y]
                for x in range(width - 1):
                    step = below[x + 1] - row[x]
                    out[x] += step * step
                out = squares[_DOWN_LEFT, y]
                for x in range(1, width):
                    step = below[x - 1] - row[x]
                    out[x] += step * step
    for y in range(height):
        squares[_RIGHT, y, width - 1] = squares[_DOWN_RIGHT, y, width - 1] = squares[_DOWN_LEFT, y, 0] = np.inf
    for x in range(width):
        squares[_DOWN, height - 1, x] = squares[_DOWN_RIGHT, height - 1, x] = squares[_DOWN_LEFT, height - 1, x] = np.inf
    costs = squares.reshape(4, n_pixels)
    for direction in range(4):
        for pixel in range(n_pixels):
            costs[direction, pixel] = np.sqrt(costs[direction, pixel])
    bits = costs.view(np.uint64)
    cut = np.uint64(id_bits - 1)  # a non-negative float64 has 63 significant bits; 64 - id_bits of them are kept
    shift = np.uint64(id_bits)
    keys = np.empty(4 * n_pixels, np.uint64)
    for direction in range(4):
        for pixel in range(n_pixels):
            keys[direction * n_pixels + pixel] = ((bits[direction, pixel] >> cut) << shift) | np.uint64(
                4 * pixel + direction)
    return costs, keys


@intrinsic
def _prefetch(typingctx, array, row):
    """A hint to the CPU to load row ``row`` of a C-contiguous array into its caches (a no-op for results)."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        row_index = context.cast(builder, args[1], signature.args[1], numba.types.intp)
        indices = [row_index] + [context.get_constant(numba.types.intp, 0)] * (array_type.ndim - 1)
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, indices, wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8"
        )
        # read (0), keep in all cache levels (3), data cache (1)
        builder.call(function, [builder.bitcast(pointer, byte_pointer), int32(0), int32(3), int32(1)])
        return context.get_dummy_value()

    return numba.types.void(array, row), codegen


@numba.njit(cache=True, nogil=True)
def _find_root(nodes: np.ndarray, node: int) -> int:
    """Root of node's component, halving the path on the way.

    ``nodes[:, 0]`` holds a pixel's parent, or minus its component's size where the pixel is the root.
    """
    parent = nodes[node, 0]
    while parent >= 0:
        grandparent = nodes[parent, 0]
        if grandparent < 0:
            return parent
        nodes[node, 0] = grandparent
        node = grandparent
        parent = nodes[node, 0]
    return node


@numba.njit(cache=True, nogil=True)
def _cost(costs: np.ndarray, edge: int) -> float:
    """The float64 cost of an edge id in the (direction, pixel) table."""
    edge = np.int64(edge)
    return costs[edge & 3, edge >> 2]


@numba.njit(cache=True, nogil=True)
def _order_equal_keys(keys: np.ndarray, costs: np.ndarray, id_bits: int) -> None:
    """Within each run of equal kept cost bits, put the edges in float64 cost order (stable), in place.

    The kept bits hold 33 of the mantissa's 52 at ImageNet size (22 or more under 2**29 pixels), so such runs
    are exact ties (their order, by edge id, already right) but for the rare near-tie, common only in the noise
    of flat areas (costs about 1e-10); the long runs of zero keys, zero costs, are skipped.
    """
    shift = np.uint64(id_bits)
    mask = (np.uint64(1) << shift) - np.uint64(1)
    zero = np.uint64(0)
    n_edges = keys.size
    i = 1
    while i < n_edges:
        kept = keys[i] >> shift
        if kept != keys[i - 1] >> shift or kept == zero:
            i += 1
            continue
        start, stop = i - 1, i + 1
        while stop < n_edges and keys[stop] >> shift == kept:
            stop += 1
        for j in range(start + 1, stop):  # insertion sort: runs are short
            key, k = keys[j], j - 1
            cost = _cost(costs, key & mask)
            while k >= start and _cost(costs, keys[k] & mask) > cost:
                keys[k + 1] = keys[k]
                k -= 1
            keys[k + 1] = key
        i = stop


@numba.njit(cache=True, nogil=True)
def _merge_components(
    keys: np.ndarray, costs: np.ndarray, id_bits: int, height: int, width: int, scale: float, min_size: int
) -> np.ndarray:
    """Labels (raster order of first pixel) from the edges' sort keys in increasing cost.

    The merge test (cost < a float32 bound) is settled by the key's kept cost bits unless they equal the
    bound's, so the float64 cost, a random read, is fetched only then and for merges.
    """
    n_pixels = height * width
    n_edges = keys.size
    shift = np.uint64(id_bits)
    cut = np.uint64(id_bits - 1)
    mask = (np.uint64(1) << shift) - np.uint64(1)
    offsets = np.array([1, width, width + 1, width - 1])
    # One (parent or minus size, merge bound) record per pixel, so that the root lookups, the bound test and the
    # merge of an edge read one cache line per end; pass 1 is bound by these random reads, and fetching the
    # records of edges ahead hides part of them. A root's float32 bound, internal cost + scale / size,
    # changes only when the root merges, so it is kept rather than divided anew for both ends of every edge
    # (the values are the same).
    nodes = np.empty((n_pixels, 2), np.int32)
    bounds = nodes.view(np.float32)  # column 1, as float32
    for pixel in range(n_pixels):
        nodes[pixel, 0] = -1
        bounds[pixel, 1] = np.float32(scale)
    bound_bits = np.empty(1, np.float64)
    for i in range(n_edges):
        if i + PREFETCH_DISTANCE < n_edges:
            ahead = np.int64(keys[i + PREFETCH_DISTANCE] & mask)
            _prefetch(nodes, ahead >> 2)
            _prefetch(nodes, (ahead >> 2) + offsets[ahead & 3])
        edge = np.int64(keys[i] & mask)
        first = edge >> 2
        root0 = _find_root(nodes, first)
        root1 = _find_root(nodes, first + offsets[edge & 3])
        if root0 == root1:
            continue
        bound_bits[0] = np.float64(min(bounds[root0, 1], bounds[root1, 1]))
        kept_cost, kept_bound = keys[i] >> shift, bound_bits.view(np.uint64)[0] >> cut
        if kept_cost > kept_bound or (kept_cost == kept_bound and not _cost(costs, edge) < bound_bits[0]):
            continue
        if nodes[root0, 0] > nodes[root1, 0]:  # root0's component is the smaller: it joins root1's
            root0, root1 = root1, root0
        merged_size = nodes[root0, 0] + nodes[root1, 0]
        nodes[root1, 0] = root0
        nodes[root0, 0] = merged_size
        bounds[root0, 1] = np.float32(_cost(costs, edge) + scale / -merged_size)

    # Pass 2: a byte per pixel marks those whose component is under min_size when the pass begins (an array that
    # stays in cache); sizes only grow, so an edge between two unmarked pixels never merges and is skipped
    # without a root lookup.
    roots = np.empty(n_pixels, np.int32)
    small = np.empty(n_pixels, np.bool_)
    any_small = False
    for pixel in range(n_pixels):
        roots[pixel] = _find_root(nodes, pixel)
        small[pixel] = -nodes[roots[pixel], 0] < min_size
        any_small = any_small or small[pixel]
    if any_small:
        for i in range(n_edges):
            edge = np.int64(keys[i] & mask)
            first = edge >> 2
            second = first + offsets[edge & 3]
            if not small[first] and not small[second]:
                continue
            root0, root1 = _find_root(nodes, first), _find_root(nodes, second)
            size0, size1 = -nodes[root0, 0], -nodes[root1, 0]
            if root0 != root1 and (size0 < min_size or size1 < min_size):
                if size0 < size1:
                    root0, root1 = root1, root0
                nodes[root1, 0] = root0
                nodes[root0, 0] = -(size0 + size1)
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
    if 4 * height * width >= 2**31:  # edge ids share a 64-bit sort key with the cost's leading 33 or more bits
        raise ValueError(f"felzenszwalb takes images under 2**29 pixels, got {height}x{width}")
    if height == 0 or width == 0:
        return np.zeros((height, width), dtype=np.int32)
    id_bits = max(1, int(4 * height * width - 1).bit_length())
    costs, keys = _edge_costs(gaussian_planes(rgb, float(sigma)), id_bits)
    keys.sort()
    # The edges that exist: right, down, down-right and down-left ones; the others cost infinity, so are last.
    keys = keys[: height * (width - 1) + (height - 1) * width + 2 * (height - 1) * (width - 1)]
    _order_equal_keys(keys, costs, id_bits)
    return _merge_components(keys, costs, id_bits, height, width, float(scale) / 255.0, int(min_size))
