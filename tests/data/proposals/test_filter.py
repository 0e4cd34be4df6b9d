"""SoCo's filter and each step of its fallback chain, on hand-made boxes."""

import numpy as np
import pytest

from soco.data.proposals.filter import FilterLevel, FilterRules, filter_proposals


def boxes(*rows):
    return np.array(rows, dtype=np.float32).reshape(-1, 4)


def test_full_filter_keeps_only_boxes_meeting_all_three_rules():
    # 100x100 image: relative scale = sqrt(w*h)/100.
    candidates = boxes(
        [0, 0, 50, 50],  # kept: 50x50, aspect 1, scale 0.5
        [2, 10, 98, 42],  # kept: 96x32, aspect exactly 3, scale 0.554
        [0, 0, 90, 90],  # scale 0.9 > 0.8
        [0, 0, 99, 32],  # aspect 3.09 > 3
        [0, 0, 31.9, 60],  # width < 32
        [5, 5, 25, 25],  # 20x20, too small
    )
    kept, level = filter_proposals(candidates, 100, 100)
    assert level is FilterLevel.FULL
    np.testing.assert_array_equal(kept, boxes([0, 0, 50, 50], [2, 10, 98, 42]))


def test_scale_bounds_are_inclusive():
    # 200x200 image: 60x60 is scale exactly 0.3 and 160x160 exactly 0.8; 59 and 161 fall outside.
    candidates = boxes([0, 0, 60, 60], [0, 0, 160, 160], [0, 0, 59, 59], [0, 0, 161, 161])
    kept, level = filter_proposals(candidates, 200, 200)
    assert level is FilterLevel.FULL
    np.testing.assert_array_equal(kept, boxes([0, 0, 60, 60], [0, 0, 160, 160]))


def test_scale_uses_image_area_of_non_square_images():
    # 400x100 image: sqrt(WH) = 200, so a 60x60 box has scale 0.3 and a 50x50 box 0.25.
    kept, level = filter_proposals(boxes([0, 0, 60, 60], [0, 0, 50, 50]), 400, 100)
    assert level is FilterLevel.FULL
    np.testing.assert_array_equal(kept, boxes([0, 0, 60, 60]))


def test_first_fallback_drops_the_scale_rule():
    candidates = boxes([0, 0, 90, 90], [0, 0, 99, 32], [0, 0, 20, 20])
    kept, level = filter_proposals(candidates, 100, 100)
    assert level is FilterLevel.ASPECT_ONLY
    np.testing.assert_array_equal(kept, boxes([0, 0, 90, 90]))


def test_second_fallback_keeps_only_the_size_floor():
    candidates = boxes([0, 0, 99, 32], [0, 0, 20, 20], [0, 0, 33, 100])
    kept, level = filter_proposals(candidates, 100, 100)
    assert level is FilterLevel.SIZE_ONLY
    np.testing.assert_array_equal(kept, boxes([0, 0, 99, 32], [0, 0, 33, 100]))


@pytest.mark.parametrize("candidates", [boxes([0, 0, 20, 20], [3, 3, 30, 90]), np.zeros((0, 4), np.float32)])
def test_last_fallback_is_the_whole_image(candidates):
    kept, level = filter_proposals(candidates, 640, 480)
    assert level is FilterLevel.WHOLE_IMAGE
    np.testing.assert_array_equal(kept, boxes([0, 0, 640, 480]))


def test_duplicates_are_kept_in_order_as_the_release_keeps_them():
    candidates = boxes([10, 10, 60, 60], [0, 0, 50, 50], [10, 10, 60, 60], [0, 0, 5, 5])
    kept, _ = filter_proposals(candidates, 100, 100)
    np.testing.assert_array_equal(kept, boxes([10, 10, 60, 60], [0, 0, 50, 50], [10, 10, 60, 60]))


def test_custom_rules_change_thresholds():
    rules = FilterRules(min_side=10, max_aspect=2, min_relative_scale=0.1, max_relative_scale=0.5)
    candidates = boxes([0, 0, 20, 20], [0, 0, 30, 10], [0, 0, 60, 60])
    kept, level = filter_proposals(candidates, 100, 100, rules)
    assert level is FilterLevel.FULL
    np.testing.assert_array_equal(kept, boxes([0, 0, 20, 20]))
