"""Selective search: boxes find real objects, use original pixels, and are reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from soco.data.proposals.felzenszwalb import felzenszwalb
from soco.data.proposals.filter import filter_proposals
from soco.data.proposals.selective_search import (
    ALGORITHM_NAMES,
    DEFAULT_ALGORITHM,
    MAX_FAST_REGIONS,
    ProposalAlgorithm,
    _corner_inside_pairs,
    _hierarchical_grouping,
    _lbp_codes,
    _package_grouping,
    _package_region_features,
    _row_sum,
    _segment,
    package_selective_search_boxes,
    get_algorithm,
)
from soco.errors import ConfigError

# Two flat rectangles on a grey background, x1 y1 x2 y2 with exclusive max edges.
RED_BOX = (8, 10, 40, 42)
BLUE_BOX = (52, 28, 88, 66)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of many (x1 y1 x2 y2, exclusive max edges)."""
    box = np.asarray(box, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def two_rectangles() -> np.ndarray:
    """A 96x72 image: a red and a blue rectangle on grey, with mild seeded noise."""
    rng = np.random.default_rng(0)
    image = np.full((72, 96, 3), 128, dtype=np.int16)
    x1, y1, x2, y2 = RED_BOX
    image[y1:y2, x1:x2] = (220, 30, 30)
    x1, y1, x2, y2 = BLUE_BOX
    image[y1:y2, x1:x2] = (30, 40, 210)
    image += rng.integers(-4, 5, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def large_scene() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A 600x400 image (large enough that `rich` downscales) with one green rectangle at known pixels."""
    rng = np.random.default_rng(1)
    image = np.full((400, 600, 3), 200, dtype=np.int16)
    box = (150, 100, 390, 300)
    image[box[1] : box[3], box[0] : box[2]] = (40, 160, 60)
    image += rng.integers(-6, 7, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8), box


def assert_valid_boxes(boxes: np.ndarray, width: int, height: int) -> None:
    """Check shape, dtype, positive extent and image bounds of proposal boxes."""
    assert boxes.dtype == np.float32
    assert boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 0
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert np.all(boxes[:, :2] >= 0)
    assert np.all(boxes[:, 2] <= width) and np.all(boxes[:, 3] <= height)


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_boxes_find_both_rectangles(name):
    image = two_rectangles()
    boxes = get_algorithm(name)(image)
    assert_valid_boxes(boxes, 96, 72)
    for rectangle in (RED_BOX, BLUE_BOX):
        assert box_iou(rectangle, boxes).max() >= 0.9, f"{name} misses {rectangle}"


def test_reference_box_edges_are_exclusive_and_exact():
    boxes = get_algorithm("repaired")(two_rectangles())
    # A region covering columns 8..39 must give x1 = 8 and x2 = 40, not 39.
    for rectangle in (RED_BOX, BLUE_BOX):
        assert np.any(np.all(boxes == np.array(rectangle, dtype=np.float32), axis=1)), rectangle
    # The last merge is the whole image.
    np.testing.assert_array_equal(boxes[-1], [0, 0, 96, 72])


def test_reference_yields_one_box_per_region_ever_formed():
    from skimage.segmentation import felzenszwalb

    image = two_rectangles()
    labels = felzenszwalb(image / 255.0, scale=300, sigma=0.9, min_size=100, channel_axis=-1)
    n_regions = len(np.unique(labels))
    assert n_regions >= 3  # background and two rectangles at least
    # n leaves and, on a connected region graph, n - 1 merges.
    assert len(get_algorithm("repaired")(image)) == 2 * n_regions - 1


def test_grouping_merges_the_most_similar_neighbours_first():
    # Three regions side by side in a 3x1 image; A and C look alike but only A-B and B-C touch.
    sizes = np.array([1.0, 1.0, 1.0])
    boxes = np.array([[0, 0, 1, 1], [1, 0, 2, 1], [2, 0, 3, 1]], dtype=np.float64)
    colour = np.array([[1.0, 0.0], [0.6, 0.4], [1.0, 0.0]])
    texture = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pairs = np.array([[0, 1], [1, 2]])
    out = _hierarchical_grouping(sizes, boxes, colour, texture, pairs, image_size=3.0)
    # A-B share colour 0.6 and all texture; B-C share colour 0.6 and no texture: A-B merge first.
    np.testing.assert_array_equal(out[3], [0, 0, 2, 1])
    np.testing.assert_array_equal(out[4], [0, 0, 3, 1])
    assert len(out) == 5


def test_rich_boxes_are_in_original_pixels():
    image, rectangle = large_scene()
    boxes = get_algorithm("rich")(image)
    assert_valid_boxes(boxes, 600, 400)
    # Boxes left in working pixels (160 px wide) could neither reach 600 nor match the rectangle.
    np.testing.assert_array_equal(boxes.max(axis=0)[2:], [600, 400])
    best = boxes[box_iou(rectangle, boxes).argmax()]
    assert box_iou(rectangle, boxes).max() >= 0.95
    # One working pixel spans 600 / 160 = 3.75 original pixels.
    assert np.all(np.abs(best - np.array(rectangle)) <= 4), best


def test_rich_keeps_the_object_after_filtering():
    image, rectangle = large_scene()
    kept, _ = filter_proposals(get_algorithm("rich")(image), 600, 400)
    assert box_iou(rectangle, kept).max() >= 0.95


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_deterministic(name):
    rng = np.random.default_rng(2)
    if name in ("release", "package", "rich"):
        image = rng.integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    else:
        image = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    algorithm = get_algorithm(name)
    first, second = algorithm(image), algorithm(image.copy())
    assert len(first) > 1
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_params_round_trip_through_json(name):
    algorithm = get_algorithm(name)
    rebuilt = ProposalAlgorithm(name=name, params=json.loads(json.dumps(algorithm.params)))
    image = two_rectangles()
    np.testing.assert_array_equal(rebuilt(image), algorithm(image))


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_grayscale_equals_replicated_rgb(name):
    grey = two_rectangles()[:, :, 0]
    algorithm = get_algorithm(name)
    np.testing.assert_array_equal(algorithm(grey), algorithm(np.stack([grey] * 3, axis=2)))


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (2, 2, 3), (3, 5, 3)])
def test_tiny_images_do_not_crash(name, shape):
    image = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    boxes = get_algorithm(name)(image)
    assert_valid_boxes(boxes, shape[1], shape[0])


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_empty_image_gives_no_boxes(name):
    boxes = get_algorithm(name)(np.zeros((0, 5, 3), dtype=np.uint8))
    assert boxes.shape == (0, 4) and boxes.dtype == np.float32


def test_non_uint8_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        get_algorithm("package")(np.zeros((10, 10, 3), dtype=np.float32))


@pytest.mark.parametrize(("typo", "meant"), [("relaese", "release"), ("pakage", "package"), ("repiared", "repaired"), ("ritch", "rich")])
def test_unknown_name_suggests_the_closest(typo, meant):
    with pytest.raises(ConfigError) as caught:
        get_algorithm(typo)
    message = str(caught.value)
    assert f"did you mean {meant!r}" in message
    for name in ALGORITHM_NAMES:
        assert name in message


def test_names_and_default():
    assert ALGORITHM_NAMES == ("release", "package", "rich", "repaired")
    assert DEFAULT_ALGORITHM == "release"
    for name in ALGORITHM_NAMES:
        assert get_algorithm(name).name == name


# --- fast: the selectivesearch package's algorithm, reproduced --------------------------------

# Three flat rectangles on a flat grey background, x1 y1 x2 y2 (exclusive), every edge a multiple of 3.
THREE_RECTANGLES = (
    ((9, 12, 39, 42), (220, 30, 30)),
    ((51, 6, 84, 33), (30, 40, 210)),
    ((45, 45, 90, 66), (40, 170, 60)),
)


def flat_scene(height: int, width: int, rectangles, background=(128, 128, 128), noise: int = 0) -> np.ndarray:
    """Flat rectangles painted in order on a flat background, with optional seeded noise of +-noise."""
    image = np.zeros((height, width, 3), dtype=np.int16)
    image[:] = background
    for (x1, y1, x2, y2), colour in rectangles:
        image[y1:y2, x1:x2] = colour
    if noise:
        image += np.random.default_rng(3).integers(-noise, noise + 1, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def scaled(rectangles, factor: int):
    """The rectangles with every coordinate multiplied by factor."""
    return tuple((tuple(c * factor for c in box), colour) for box, colour in rectangles)


@pytest.mark.parametrize(("factor", "noise", "max_side"), [(1, 0, 1024), (1, 6, 1024), (4, 0, 256), (4, 6, 256)])
def test_package_default_finds_each_rectangle(factor, noise, max_side):
    # factor 4 gives a 384x288 image, shrunk here to 256x192 before segmenting.
    rectangles = scaled(THREE_RECTANGLES, factor)
    image = flat_scene(72 * factor, 96 * factor, rectangles, noise=noise)
    boxes = ProposalAlgorithm("package", dict(get_algorithm("package").params, max_side=max_side))(image)
    assert_valid_boxes(boxes, 96 * factor, 72 * factor)
    for box, _ in rectangles:
        assert box_iou(box, boxes).max() >= 0.9, box


def test_package_hierarchy_of_three_rectangles_gives_four_boxes():
    # Without blur the segmentation is the 4 flat regions, numbered in raster order: background
    # (first pixel), blue (row 6), red (row 12), green (row 45). Every rectangle has its corners strictly
    # inside the background's box and none inside another rectangle's, so the neighbour pairs are the
    # 3 (background, rectangle) pairs; the 3 merges each give the whole image again. Distinct boxes:
    # the 4 regions, in region order.
    image = flat_scene(72, 96, THREE_RECTANGLES)
    assert int(_segment(image, 500.0, 0.0, 10).max()) + 1 == 4
    boxes = package_selective_search_boxes(image, sigma=0.0)
    expected = [[0, 0, 96, 72], [51, 6, 84, 33], [9, 12, 39, 42], [45, 45, 90, 66]]
    np.testing.assert_array_equal(boxes, np.array(expected, dtype=np.float32))


def test_package_maps_shrunk_boxes_to_exact_original_pixels():
    # 384x288 is shrunk by 1.5 to 256x192; edges on multiples of 3 original pixels fall on whole
    # working pixels, so the four boxes come back exactly (x4 the previous test's).
    image = flat_scene(288, 384, scaled(THREE_RECTANGLES, 4))
    boxes = package_selective_search_boxes(image, max_side=256, sigma=0.0)
    expected = [[0, 0, 384, 288], [204, 24, 336, 132], [36, 48, 156, 168], [180, 180, 360, 264]]
    np.testing.assert_array_equal(boxes, np.array(expected, dtype=np.float32))


def test_package_never_merges_regions_without_a_corner_inside():
    # Two halves touch along a column, but neither has a corner strictly inside the other's box:
    # the package never merges them, so there is no whole-image box.
    image = flat_scene(64, 80, (((40, 0, 80, 64), (30, 40, 210)),), background=(220, 30, 30))
    boxes = package_selective_search_boxes(image, sigma=0.0)
    np.testing.assert_array_equal(boxes, np.array([[0, 0, 40, 64], [40, 0, 80, 64]], dtype=np.float32))


def test_corner_inside_pairs_follow_the_package_order():
    # Inclusive boxes. 1 has its top-left corner inside 0; 2 lies inside 0 entirely; 3 contains all of
    # 0, 1 and 2, but only the later box's corners are tested and none of 3's is inside them; 4 starts
    # on 0's right edge (x = 50, not strictly inside) and lies inside 3.
    boxes = np.array(
        [[10, 10, 50, 50], [40, 40, 70, 70], [20, 20, 30, 30], [0, 0, 90, 90], [50, 10, 60, 20]], dtype=np.float64
    )
    pairs = _corner_inside_pairs(boxes, chunk=2)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (0, 2), (3, 4)]


def test_package_grouping_merges_by_histogram_size_and_fill():
    # Three 1x1-pixel regions side by side in a 3x1 image (inclusive boxes). Pairs (0, 1) and (1, 2).
    # Size term: 1 - 2/3 for both pairs; fill: both unions are 2x0 boxes (inclusive max - min), so
    # 1 - (0 - 2)/3. Histograms: 0-1 share 0.75, 1-2 share 0.25, so 0 and 1 merge first, then (01, 2).
    sizes = np.ones(3)
    boxes = np.array([[0, 0, 0, 0], [1, 0, 1, 0], [2, 0, 2, 0]], dtype=np.float64)
    hists = np.array([[1.0, 0.0], [0.75, 0.25], [0.0, 1.0]])
    out = _package_grouping(sizes, boxes, hists, np.array([[0, 1], [1, 2]]), image_size=3.0)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0], [1, 0, 1, 0], [2, 0, 2, 0], [0, 0, 1, 0], [0, 0, 2, 0]])


def test_package_grouping_leaves_isolated_regions_unmerged():
    # Regions 0 and 1 are neighbours, 2 has no pair: one merge, 3 + 1 boxes, no whole-image box.
    sizes = np.array([4.0, 4.0, 4.0])
    boxes = np.array([[0, 0, 1, 1], [2, 0, 3, 1], [0, 3, 3, 3]], dtype=np.float64)
    out = _package_grouping(sizes, boxes, np.ones((3, 2)) / 2, np.array([[0, 1]]), image_size=16.0)
    assert len(out) == 4
    np.testing.assert_array_equal(out[3], [0, 0, 3, 1])


def test_package_grouping_with_a_hub_matches_the_plain_greedy_order():
    # A region neighbouring every other (the package's background) makes every merge touch many rows;
    # the lazily bounded rows must still merge in exactly the plain greedy order.
    rng = np.random.default_rng(4)
    n = 40
    sizes = rng.integers(1, 50, size=n).astype(np.float64)
    corners = rng.integers(0, 60, size=(n, 2)).astype(np.float64)
    boxes = np.concatenate([corners, corners + rng.integers(0, 10, size=(n, 2))], axis=1)
    hists = rng.random((n, 6))
    hists /= hists.sum(axis=1, keepdims=True)
    pairs = np.array([(0, b) for b in range(1, n)] + [(b, b + 1) for b in range(1, n - 1, 3)])
    out = _package_grouping(sizes, boxes, hists, pairs, image_size=4900.0)
    np.testing.assert_array_equal(out, plain_greedy(sizes, boxes, hists, pairs, 4900.0))


@pytest.mark.parametrize("length", [3, 7, 8, 9, 16, 23, 31, 64])
def test_row_sum_adds_in_numpys_order(length):
    # Similarities of different pairs can differ in the last bit only; summing as numpy does keeps the
    # merge order of the grouping the same as a numpy computation of it.
    rows = np.random.default_rng(length).random((500, length)) * 10.0 ** np.arange(-3, 4).repeat(72)[:500, None]
    numpy_sums = rows.sum(axis=-1)
    ours = np.array([_row_sum(row) for row in rows])
    np.testing.assert_array_equal(ours, numpy_sums)
    assert not np.array_equal(ours, np.array([sum(row.tolist()) for row in rows])) or length < 8


def plain_greedy(sizes, boxes, hists, pairs, image_size):
    """The package's loop written plainly: recompute every current pair's similarity at every step."""
    regions = {i: (sizes[i], boxes[i].copy(), hists[i].copy()) for i in range(len(sizes))}
    links = {tuple(p) for p in pairs.tolist()}
    out = [b.copy() for b in boxes]

    def sim(a, b):
        (sa, ba, ha), (sb, bb, hb) = regions[a], regions[b]
        extent = np.maximum(ba[2:], bb[2:]) - np.minimum(ba[:2], bb[:2])
        fill = 1.0 - (extent[0] * extent[1] - sa - sb) / image_size
        return np.minimum(ha, hb).sum() + (1.0 - (sa + sb) / image_size) + fill

    while links:
        a, b = max(sorted(links), key=lambda pair: sim(*pair))
        a, b = min(a, b), max(a, b)
        (sa, ba, ha), (sb, bb, hb) = regions.pop(a), regions.pop(b)
        box = np.concatenate([np.minimum(ba[:2], bb[:2]), np.maximum(ba[2:], bb[2:])])
        regions[a] = (sa + sb, box, (ha * sa + hb * sb) / (sa + sb))
        out.append(box)
        links = {tuple(sorted(a if x == b else x for x in link)) for link in links if set(link) != {a, b}}
    return np.array(out)


def test_segment_coarsens_until_the_grouping_matrix_fits():
    # 96x96 noise with k=1 and no minimum gives one region per pixel (9216), over the 4096 the grouping
    # takes; with min_size doubled to 2 every region has at least 2 pixels, and that segmentation fits.
    noise = np.random.default_rng(0).integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    assert int(felzenszwalb(noise, 1.0, 0.0, 1).max()) + 1 == 96 * 96
    labels = _segment(noise, 1.0, 0.0, 1)
    assert MAX_FAST_REGIONS == 4096
    np.testing.assert_array_equal(labels, felzenszwalb(noise, 1.0, 0.0, 2))
    assert int(labels.max()) + 1 <= MAX_FAST_REGIONS
    assert np.bincount(labels.ravel()).min() >= 2


@pytest.mark.parametrize("photo", ["astronaut", "coffee", "camera"])
def test_lbp_codes_equal_scikit_image(photo):
    # The texture histograms count skimage's LBP codes (the package's: codes 0 and 1), whose diagonal neighbours
    # are interpolated: equal-to-the-bit arithmetic decides pixels on flat ground, so every code must match.
    import skimage.data
    from skimage.feature import local_binary_pattern

    image = getattr(skimage.data, photo)()[:160, :200]
    channels = image.reshape(*image.shape[:2], -1)
    for channel in range(channels.shape[2]):
        plane = np.ascontiguousarray(channels[:, :, channel])
        expected = local_binary_pattern(plane, 8, 1.0).astype(np.uint8)
        assert (expected < 2).mean() > 0.03  # the photo has codes 0 and 1 to compare
        np.testing.assert_array_equal(_lbp_codes(plane), expected)


def test_package_region_features_by_hand():
    # 2x3 image, two regions: left column (label 0) and the rest (label 1). Values max(R, G, B): 0, 255 on
    # the left; 10 everywhere else -> bins 0, 24 and 0 (np.histogram's 25 bins of 0..255, last edge closed).
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[1, 0] = (255, 0, 0)
    rgb[:, 1:] = 10
    labels = np.array([[0, 1, 1], [0, 1, 1]], dtype=np.int32)
    sizes, boxes, hists, pairs = _package_region_features(labels, rgb)
    np.testing.assert_array_equal(sizes, [2, 4])
    np.testing.assert_array_equal(boxes, [[0, 0, 0, 1], [1, 0, 2, 1]])  # inclusive max
    np.testing.assert_array_equal(hists[0, :25], np.eye(25)[0] / 2 + np.eye(25)[24] / 2)
    np.testing.assert_array_equal(hists[1, :25], np.eye(25)[0])
    # Texture (skimage's codes; 0 outside the image). Every pixel of value 10 has a neighbour of 10, and
    # the black pixel (0, 0) has outside neighbours of 0: codes >= 2, not counted. The red pixel's channel 0
    # (255) sees only darker neighbours, its right-hand one included: code 0. So one count in eight.
    expected_texture = np.zeros((2, 6))
    expected_texture[0, 0] = 1 / 2
    np.testing.assert_array_equal(hists[:, 25:], expected_texture)
    from skimage.feature import local_binary_pattern

    for channel in range(3):
        codes = local_binary_pattern(np.ascontiguousarray(rgb[:, :, channel]), 8, 1.0)
        for region in range(2):
            for code in range(2):
                expected = ((labels == region) & (codes == code)).sum() / sizes[region]
                assert hists[region, 25 + 2 * channel + code] == expected
    assert len(pairs) == 0  # neither box has a corner strictly inside the other


def test_package_is_about_as_many_kept_boxes_as_rectangles_allow():
    # The three-rectangle scene at 288x384 (default blur): each rectangle passes SoCo's filter once it
    # is found, and the kept set is a handful, not the pooled hierarchies' dozens of `rich`.
    image = flat_scene(288, 384, scaled(THREE_RECTANGLES, 4), noise=6)
    package_kept, _ = filter_proposals(get_algorithm("package")(image), 384, 288)
    rich_kept, _ = filter_proposals(get_algorithm("rich")(image), 384, 288)
    for box, _ in scaled(THREE_RECTANGLES, 4):
        assert box_iou(box, package_kept).max() >= 0.9
    assert len(package_kept) < len(rich_kept)


def test_package_gives_the_package_boxes_on_a_photo():
    from skimage.data import astronaut

    # Checked against the selectivesearch package 0.4 (scale 500, sigma 0.9, min_size 10) on this photo:
    # its 375 rects (x, y, w, h) are exactly these boxes less one pixel at the max edges, since the package
    # reports w = max - min where a box that covers its last pixel ends one further.
    boxes = get_algorithm("package")(astronaut())
    assert_recorded(boxes, 375, [85399, 98692, 103678, 123631], [[0, 0, 16, 27], [0, 0, 62, 145], [10, 0, 114, 228]],
                    [[0, 0, 400, 512], [0, 0, 512, 512]])


def assert_recorded(boxes: np.ndarray, count: int, column_sums, first_rows, last_rows) -> None:
    """Boxes equal a recorded run: their count, column sums, first and last rows."""
    assert len(boxes) == count
    np.testing.assert_array_equal(boxes.sum(axis=0), column_sums)
    np.testing.assert_array_equal(boxes[: len(first_rows)], first_rows)
    np.testing.assert_array_equal(boxes[-len(last_rows) :], last_rows)


# --- rich: today's set, unchanged ------------------------------------------------------------------

# `fast` before the package-matching version (same code, now named `rich`), on two_rectangles().
RICH_TWO_RECTANGLES = [
    [0, 0, 33, 72], [28, 0, 96, 46], [8, 10, 40, 42], [52, 28, 88, 66], [76, 28, 88, 41], [36, 31, 52, 48],
    [64, 40, 72, 46], [59, 40, 96, 72], [9, 42, 67, 72], [32, 48, 40, 54], [44, 51, 52, 64], [9, 31, 67, 72],
    [9, 31, 96, 72], [9, 0, 96, 72], [0, 0, 96, 72], [8, 10, 52, 48], [52, 28, 96, 72], [8, 10, 67, 72],
    [28, 0, 96, 72], [0, 0, 67, 72], [44, 28, 88, 66], [44, 28, 96, 72],
]


def test_rich_gives_the_previous_default_boxes():
    boxes = get_algorithm("rich")(two_rectangles())
    np.testing.assert_array_equal(boxes, np.array(RICH_TWO_RECTANGLES, dtype=np.float32))


def test_rich_gives_the_previous_default_boxes_on_a_photo():
    from skimage.data import astronaut

    boxes = get_algorithm("rich")(astronaut())
    # Recorded from the previous default before the change: 597 boxes, their column sums, a few rows.
    assert_recorded(boxes, 597, [117493, 116758, 174150, 197924], [[0, 0, 13, 70], [0, 0, 32, 160], [26, 0, 144, 99]],
                    [[0, 0, 339, 512], [0, 0, 368, 512]])


def test_fingerprint_follows_name_and_parameters():
    package, rich = get_algorithm("package"), get_algorithm("rich")
    assert package.fingerprint == get_algorithm("package").fingerprint
    assert len({get_algorithm(name).fingerprint for name in ALGORITHM_NAMES}) == 4
    changed = ProposalAlgorithm("package", dict(package.params, max_side=320))
    assert changed.fingerprint != package.fingerprint


# --- release: SoCo's release's own selective search -----------------------------------------------


def small_photos() -> dict[str, np.ndarray]:
    """Real photos small enough for the release's pure-Python function to take about a second each."""
    from skimage.data import astronaut, chelsea, coffee

    return {"chelsea": chelsea(), "astronaut crop": astronaut()[40:280, 120:420], "coffee crop": coffee()[:240, 150:470]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chelsea", "astronaut crop", "coffee crop"])
def test_release_boxes_equal_the_release_functions_rects(name):
    from tests.reference.release_selective_search import release_rects, rects_as_boxes

    image = np.ascontiguousarray(small_photos()[name])
    expected = rects_as_boxes(release_rects(image))
    boxes = get_algorithm("release")(image)
    # box for box, in the release's order, duplicates included (no tie in the merge order on these photos)
    np.testing.assert_array_equal(boxes, expected)
    assert len(np.unique(expected, axis=0)) < len(expected)  # the release's list does hold rects twice


def test_release_texture_bins_are_skimages_lbp_codes_binned_as_numpy_bins_them():
    from skimage.feature import local_binary_pattern

    from soco.data.proposals.selective_search import _texture_bins

    for image in small_photos().values():
        bins = _texture_bins(np.ascontiguousarray(image.transpose(2, 0, 1)), True)
        for channel in range(3):
            codes = local_binary_pattern(image[:, :, channel].astype(np.float64), 8, 1.0)
            # np.histogram(codes, 10, (0, 255)): edges 0, 25.5, ..., 255, the last bin closed
            expected = np.minimum(np.searchsorted(np.linspace(0.0, 255.0, 11), codes, side="right") - 1, 9)
            np.testing.assert_array_equal(bins[channel], expected)


@pytest.mark.parametrize(("old", "new"), [("fast", "package"), ("reference", "repaired")])
def test_a_renamed_algorithm_points_to_its_new_name(old, new):
    with pytest.raises(ConfigError, match=f"{old!r} is now named {new!r}"):
        get_algorithm(old)
