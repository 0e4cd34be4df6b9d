"""SoCo's proposal filter and its fallback chain (size, aspect and scale rules of the paper)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class FilterLevel(IntEnum):
    """Which step of the fallback chain produced an image's proposals."""

    FULL = 0  # size floor, aspect ratio and relative scale all hold
    ASPECT_ONLY = 1  # fallback 1: size floor and aspect ratio
    SIZE_ONLY = 2  # fallback 2: size floor alone
    WHOLE_IMAGE = 3  # fallback 3: the whole image is the single proposal


@dataclass(frozen=True)
class FilterRules:
    """Thresholds of SoCo's filter, in original-image pixels (defaults from the paper's release)."""

    min_side: float = 32.0
    max_aspect: float = 3.0
    min_relative_scale: float = 0.3
    max_relative_scale: float = 0.8


def deduplicate_boxes(boxes: np.ndarray) -> np.ndarray:
    """Drop exact duplicate boxes, keeping the first occurrence and the original order."""
    if len(boxes) == 0:
        return boxes
    _, first_index = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first_index)]


def filter_proposals(
    boxes: np.ndarray, image_width: int, image_height: int, rules: FilterRules = FilterRules()
) -> tuple[np.ndarray, FilterLevel]:
    """Apply SoCo's filter to x1 y1 x2 y2 boxes, falling back step by step until a box survives.

    Returns the kept boxes (float32, input order) and the fallback level used. A box given twice is kept twice,
    as the release's filter keeps a rect twice (``selective_search/filters.py`` 56-66): its views then draw
    proposals_per_image of the kept list without replacement (``contrast/data/props_utils.py`` line 20), so such a
    box is drawn twice as often. Algorithms that want unique boxes drop their duplicates themselves (``package``, ``rich``).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    big_enough = (widths >= rules.min_side) & (heights >= rules.min_side)
    # Division only where both sides are positive; other boxes already fail the size floor.
    safe_w = np.where(big_enough, widths, 1.0)
    safe_h = np.where(big_enough, heights, 1.0)
    aspect = safe_w / safe_h
    aspect_ok = (aspect >= 1.0 / rules.max_aspect) & (aspect <= rules.max_aspect)
    relative_scale = np.sqrt(safe_w * safe_h) / np.sqrt(float(image_width) * float(image_height))
    scale_ok = (relative_scale >= rules.min_relative_scale) & (relative_scale <= rules.max_relative_scale)

    for level, keep in (
        (FilterLevel.FULL, big_enough & aspect_ok & scale_ok),
        (FilterLevel.ASPECT_ONLY, big_enough & aspect_ok),
        (FilterLevel.SIZE_ONLY, big_enough),
    ):
        if keep.any():
            return boxes[keep], level
    whole = np.array([[0.0, 0.0, float(image_width), float(image_height)]], dtype=np.float32)
    return whole, FilterLevel.WHOLE_IMAGE
