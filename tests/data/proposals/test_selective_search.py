"""Selective search: boxes find real objects, use original pixels, and are reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from soco.data.proposals.filter import filter_proposals
from soco.data.proposals.selective_search import (
    ALGORITHM_NAMES,
    DEFAULT_ALGORITHM,
    ProposalAlgorithm,
    _hierarchical_grouping,
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
    """A 600x400 image (large enough that `fast` downscales) with one green rectangle at known pixels."""
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
    boxes = get_algorithm("reference")(two_rectangles())
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
    assert len(get_algorithm("reference")(image)) == 2 * n_regions - 1


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


def test_fast_boxes_are_in_original_pixels():
    image, rectangle = large_scene()
    boxes = get_algorithm("fast")(image)
    assert_valid_boxes(boxes, 600, 400)
    # Boxes left in working pixels (160 px wide) could neither reach 600 nor match the rectangle.
    np.testing.assert_array_equal(boxes.max(axis=0)[2:], [600, 400])
    best = boxes[box_iou(rectangle, boxes).argmax()]
    assert box_iou(rectangle, boxes).max() >= 0.95
    # One working pixel spans 600 / 160 = 3.75 original pixels.
    assert np.all(np.abs(best - np.array(rectangle)) <= 4), best


def test_fast_keeps_the_object_after_filtering():
    image, rectangle = large_scene()
    kept, _ = filter_proposals(get_algorithm("fast")(image), 600, 400)
    assert box_iou(rectangle, kept).max() >= 0.95


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_deterministic(name):
    rng = np.random.default_rng(2)
    if name == "fast":
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
        get_algorithm("fast")(np.zeros((10, 10, 3), dtype=np.float32))


@pytest.mark.parametrize(("typo", "meant"), [("fsat", "fast"), ("referense", "reference")])
def test_unknown_name_suggests_the_closest(typo, meant):
    with pytest.raises(ConfigError) as caught:
        get_algorithm(typo)
    message = str(caught.value)
    assert f"did you mean {meant!r}" in message
    for name in ALGORITHM_NAMES:
        assert name in message


def test_names_and_default():
    assert ALGORITHM_NAMES == ("fast", "reference")
    assert DEFAULT_ALGORITHM == "fast"
    for name in ALGORITHM_NAMES:
        assert get_algorithm(name).name == name
