"""SoCo's release's selective search, built from the installed `selectivesearch` 0.4 package and one changed line.

The release (hologerry/SoCo) copied the package into `selective_search/selective_search.py` and changed one line
that changes results: line 140 bins the LBP texture codes over (0, 255) instead of the package's (0, 1) (the
package's issue 30). The rest differs only in formatting, spelling (neighbours/neighbors), py3 list() wrappers and
an extra `boxes` list it returns. Its proposals were generated with scale=300, sigma=0.9, min_size=100 at full
resolution (`selective_search/generate_imagenet_ss_proposals.py`, lines 22-23 and 47) and filtered with the
strategy `ratio3size0308` (`selective_search/filter_ss_proposals_json.py` line 12, `filters.py` lines 56-66).
"""

from __future__ import annotations

import importlib.util
import math
import types
from functools import lru_cache

import numpy as np

PACKAGE_LINE = "[hist] + [numpy.histogram(fd, BINS, (0.0, 1.0))[0]])"
RELEASE_LINE = "[hist] + [numpy.histogram(fd, BINS, (0.0, 255.0))[0]])"
RELEASE_PARAMETERS = {"scale": 300, "sigma": 0.9, "min_size": 100}


@lru_cache(maxsize=1)
def release_module() -> types.ModuleType:
    """The package's module with the release's texture line, as a module of its own (the package is left as is)."""
    spec = importlib.util.find_spec("selectivesearch.selectivesearch")
    source = open(spec.origin).read()
    if source.count(PACKAGE_LINE) != 1:
        raise RuntimeError(f"{spec.origin} is not selectivesearch 0.4: its texture-histogram line is not there once")
    module = types.ModuleType("release_selective_search_function")
    exec(compile(source.replace(PACKAGE_LINE, RELEASE_LINE), spec.origin, "exec"), module.__dict__)
    return module


def release_rects(rgb: np.ndarray, scale: float = 300, sigma: float = 0.9, min_size: int = 100) -> list[tuple]:
    """The release's raw rects (x, y, w, h) of an RGB uint8 image, w = max - min, in the release's order."""
    _, regions = release_module().selective_search(rgb, scale=scale, sigma=sigma, min_size=min_size)
    return [tuple(int(v) for v in region["rect"]) for region in regions]


def release_filter(rects: list[tuple], width: int, height: int) -> list[tuple]:
    """The release's `filter_ratio_size` with strategy ratio3size0308 (filters.py 56-66), rects in, rects out."""
    kept = []
    image_sqrt_size = math.sqrt(width * height)
    for x, y, w, h in rects:
        if w >= 32 and h >= 32 and 1.0 / 3 <= w / h <= 3 and 0.3 <= math.sqrt(w * h) / image_sqrt_size <= 0.8:
            kept.append((x, y, w, h))
    return kept


def rects_as_boxes(rects: list[tuple]) -> np.ndarray:
    """Rects (x, y, w, h) as (N, 4) float32 x1 y1 x2 y2 boxes with x2 = x + w (the region's last column)."""
    boxes = np.array(rects, dtype=np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return boxes
