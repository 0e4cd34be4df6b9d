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
    # 2**30 pixels would overflow the 32-bit edge ids; a broadcast view costs no memory.
    huge = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (32768, 32768, 3))
    with pytest.raises(ValueError, match="under 2\\*\\*30 pixels"):
        felzenszwalb(huge, 500.0, 0.9, 10)
