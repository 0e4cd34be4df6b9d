"""The compiled Felzenszwalb segmentation gives scikit-image's label maps, label for label."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import skimage.segmentation
import skimage.util

from soco.data.proposals.felzenszwalb import felzenszwalb, gaussian_planes


def skimage_labels(rgb: np.ndarray, scale: float, sigma: float, min_size: int) -> np.ndarray:
    """scikit-image's segmentation, called as the selectivesearch package calls it."""
    return skimage.segmentation.felzenszwalb(
        skimage.util.img_as_float(rgb),
        scale=scale,
        sigma=sigma,
        min_size=min_size,
        channel_axis=-1 if rgb.ndim == 3 else None,
    )


# Crops of scikit-image's bundled photos (colour and grey), big enough for a few hundred regions.
PHOTOS = {
    "astronaut": (slice(0, 200), slice(100, 340)),
    "coffee": (slice(150, 350), slice(200, 460)),
    "chelsea": (slice(50, 250), slice(100, 340)),
    "rocket": (slice(150, 350), slice(250, 490)),
    "coins": (slice(0, 200), slice(0, 240)),
}


@pytest.mark.slow
@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize(("scale", "sigma", "min_size"), [(500.0, 0.9, 10), (100.0, 0.5, 50), (1.0, 0.8, 20)])
def test_equals_scikit_image_on_photos(photo, scale, sigma, min_size):
    rgb = np.ascontiguousarray(getattr(skimage.data, photo)()[PHOTOS[photo]])
    expected = skimage_labels(rgb, scale, sigma, min_size)
    labels = felzenszwalb(rgb, scale, sigma, min_size)
    assert labels.dtype == np.int32 and labels.shape == rgb.shape[:2]
    assert int(expected.max()) > 20  # a real segmentation, not one region
    np.testing.assert_array_equal(labels, expected)


def test_without_blur_only_tied_edges_can_differ():
    # Without blur, uint8 steps give thousands of exactly equal costs, taken in another order than
    # numpy's quicksort takes them: a few pixels of 48,000 may change region, never the region count.
    rgb = np.ascontiguousarray(skimage.data.astronaut()[:200, 100:340])
    expected = skimage_labels(rgb, 300.0, 0.0, 5)
    labels = felzenszwalb(rgb, 300.0, 0.0, 5)
    assert labels.max() == expected.max()
    assert (labels != expected).sum() <= 10


def test_hand_computed_merges_and_numbering():
    # One row, no blur, scale 255 (so the bound of a single pixel is 255 / 255 / 1 = 1.0 on 0..1 values):
    # pixels 10, 20 (cost 10/255 < 1) merge, internal cost 10/255, bound 10/255 + 1/2; the step to 250
    # (230/255 = 0.90) exceeds that bound, and 250, 240 merge on their own. Labels follow the raster order.
    rgb = np.array([[[10] * 3, [20] * 3, [250] * 3, [240] * 3]], dtype=np.uint8)
    np.testing.assert_array_equal(felzenszwalb(rgb, 255.0, 0.0, 1), [[0, 0, 1, 1]])
    # min_size 3: after the first pass both components have 2 pixels; the cheapest edge between them
    # (250 - 20) merges them into one.
    np.testing.assert_array_equal(felzenszwalb(rgb, 255.0, 0.0, 3), [[0, 0, 0, 0]])
    # A larger scale merges everything in the first pass already.
    np.testing.assert_array_equal(felzenszwalb(rgb, 2000.0, 0.0, 1), [[0, 0, 0, 0]])


def test_labels_are_numbered_in_raster_order():
    # A flat image with a bright square: the background is met first (label 0), the square second.
    rgb = np.full((20, 30, 3), 40, dtype=np.uint8)
    rgb[5:12, 10:20] = 230
    labels = felzenszwalb(rgb, 100.0, 0.0, 5)
    assert labels[0, 0] == 0 and labels[6, 12] == 1
    assert (labels == 1).sum() == 7 * 10


def test_gaussian_planes_match_scipy_reflect():
    from scipy import ndimage

    rgb = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    expected = ndimage.gaussian_filter(rgb / 255.0, sigma=[0.9, 0.9, 0], mode="reflect", truncate=4.0)
    np.testing.assert_allclose(gaussian_planes(rgb, 0.9).transpose(1, 2, 0), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (9, 1, 3), (2, 2), (0, 5, 3)])
def test_thin_and_empty_images(shape):
    rgb = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    labels = felzenszwalb(rgb, 500.0, 0.9, 10)
    assert labels.shape == shape[:2]
    if labels.size:
        np.testing.assert_array_equal(labels, skimage_labels(rgb, 500.0, 0.9, 10))


def test_rejects_what_it_cannot_segment():
    with pytest.raises(ValueError, match="uint8"):
        felzenszwalb(np.zeros((4, 4, 3)), 500.0, 0.9, 10)
    with pytest.raises(ValueError, match="at most 4 channels"):
        felzenszwalb(np.zeros((4, 4, 5), dtype=np.uint8), 500.0, 0.9, 10)
    # From 2**29 pixels the edge ids would leave the 64-bit sort key under 33 cost bits; a broadcast view costs no memory.
    huge = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (16384, 32768, 3))
    with pytest.raises(ValueError, match="under 2\\*\\*29 pixels"):
        felzenszwalb(huge, 500.0, 0.9, 10)


def test_edges_whose_kept_cost_bits_tie_are_put_in_float64_order():
    from soco.data.proposals.felzenszwalb import _order_equal_keys

    id_bits = 4  # edge ids 0..15; the key keeps the cost's leading 60 bits, so costs 1 ulp apart tie in it
    cut, shift = np.uint64(id_bits - 1), np.uint64(id_bits)
    one = 1.0 + 2.0**-50
    costs = np.full((4, 4), np.inf)  # (direction, pixel), edge id = 4 * pixel + direction
    by_edge = {1: np.nextafter(one, 2.0), 4: one, 6: 0.0, 9: one, 14: 0.0, 3: 0.5}
    for edge, cost in by_edge.items():
        costs[edge & 3, edge >> 2] = cost
    keys = np.array([((np.array(cost).view(np.uint64) >> cut) << shift) | np.uint64(edge)
                     for edge, cost in by_edge.items()], dtype=np.uint64)
    keys.sort()
    kept = keys >> shift
    assert kept[-1] == kept[-2] == kept[-3]  # 1 + 2**-50 and its neighbour agree in the kept bits
    _order_equal_keys(keys, costs, id_bits)
    # by float64 cost, then by edge id: zeros 6, 14; 0.5 (edge 3); `one` at 4 and 9; the next float at 1
    assert [int(k & np.uint64(15)) for k in keys] == [6, 14, 3, 4, 9, 1]


def test_only_a_zero_cost_has_a_zero_key():
    from soco.data.proposals.felzenszwalb import _edge_costs

    planes = np.zeros((1, 1, 3))
    planes[0, 0, 1] = 5e-324  # the smallest step there is: its square underflows, its cost is 0
    planes[0, 0, 2] = 5e-324 + 2.0**-537
    costs, keys = _edge_costs(planes, 31)  # the most bits the key ever cuts
    right = costs[0, :2]
    assert right[0] == 0.0 and right[1] > 1e-162
    kept = keys[:2] >> np.uint64(31)  # the right-hand edges of pixels 0 and 1 come first
    assert kept[0] == 0 and kept[1] > 0
