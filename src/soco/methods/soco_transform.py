"""SoCo's sample transform: one image and its proposals become V1, V2, V3 (and SoCo*'s V4) with matching boxes.

Geometry (all in the original image's pixels, boxes x1 y1 x2 y2 with x in [0, W]):
    V1  the whole image resized to v1_size x v1_size (aspect not preserved, as in the release).
    V2  a random resized crop (crop_scale, crop_ratio) of the image, to v2_size.
    V3  "downsample" (paper): V2's geometric image resized to v3_size (same crop, own flip);
        "independent" (release): its own random resized crop to v3_size.
    V4  (use_v4, SoCo*) another random resized crop of the whole image (V1's region), to v4_size.
Every view is flipped horizontally with probability flip_prob, independently. Boxes are clipped to
each view; row i of every view's boxes is the same object.

Every random number comes from the generator handed in, drawn in a fixed order (random candidate
boxes, crops, flips, box choice, jitter, colour, cut-out), so the same generator state gives bitwise the
same views, and turning colour off leaves the geometry of a seed unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from soco.config.validation import FRACTION, POSITIVE, PROBABILITY, Range, at_least, config_rules, interval, one_of
from soco.data.collate import stack_samples
from soco.data.views import BLUR_KERNEL_RULES, ViewParams, apply_color, as_image, bernoulli, crop_region
from soco.data.views import crop_resize_flip, cut_out_boxes, draw_color_params, intersection, is_empty, jitter_boxes
from soco.data.views import normalize, overlaps, random_image_boxes, random_resized_crop

BOX_SOURCES = ("proposals", "random", "whole_image")
V3_MODES = ("downsample", "independent")
# BYOL's asymmetric colour pipeline: V1 is always blurred and never solarised, the others rarely blurred.
BLUR_PROB_V1 = 1.0
BLUR_PROB_OTHERS = 0.1
SOLARIZE_PROB_OTHERS = 0.2
# Candidate boxes drawn per image for box_source "random" (then chosen like proposals).
RANDOM_CANDIDATES = 32


@config_rules(
    v1_size=at_least(1), v2_size=at_least(1), v3_size=at_least(1), v4_size=at_least(1), v3_mode=one_of(*V3_MODES),
    crop_scale=interval(FRACTION), crop_ratio=interval(POSITIVE), flip_prob=PROBABILITY, crop_retries=at_least(0),
    proposals_per_image=at_least(1), box_source=one_of(*BOX_SOURCES), jitter_prob=PROBABILITY,
    jitter_ratio=Range(0.0, 1.0, high_open=True), blur_kernel=one_of(*BLUR_KERNEL_RULES), cutout_prob=PROBABILITY,
    cutout_area=interval(FRACTION),
)
@dataclass
class SoCoViewsConfig:
    """How SoCo's views and their boxes are made (sizes in pixels; the paper's by default)."""

    v1_size: int = 224  # V1: the whole image, resized (aspect not preserved, as in the release)
    v2_size: int = 224  # V2: random resized crop
    v3_size: int = 112  # V3: V2 downsampled
    v4_size: int = 192  # V4 (SoCo* only): another random crop of V1
    use_v3: bool = True  # Table 4 "multi view"; off: V1 and V2 only
    use_v4: bool = False  # SoCo*
    v3_mode: str = "downsample"  # "downsample" (paper) or "independent" (the release's own 112 crop)
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    flip_prob: float = 0.5
    crop_retries: int = 5  # re-draw a crop that no proposal overlaps, this many times
    proposals_per_image: int = 4  # the paper's K: boxes every view carries
    box_source: str = "proposals"  # "proposals", "random" (Table 5c) or "whole_image" (image-level BYOL)
    box_jitter: bool = True
    jitter_prob: float = 0.5
    jitter_ratio: float = 0.1
    color_augment: bool = True  # the BYOL colour pipeline
    blur_kernel: str = "sigma"  # "sigma": covers +-3 sigma; "tenth": 10% of the view side (SimCLR, BYOL)
    box_cutout: bool = False  # the release's cut-out inside boxes on V2/V3/V4 (not in the paper)
    cutout_prob: float = 0.5  # per box
    cutout_area: list[float] = field(default_factory=lambda: [0.1, 0.3])  # share of the box area erased


def view_names(config: SoCoViewsConfig) -> list[str]:
    """Names of the views `make_views` returns for this configuration, in order."""
    return ["v1", "v2"] + (["v3"] if config.use_v3 else []) + (["v4"] if config.use_v4 else [])


def boxes_per_image(config: SoCoViewsConfig) -> int:
    """proposals_per_image, the number of box rows every view carries (1 for the image-level "whole_image" baseline)."""
    return 1 if config.box_source == "whole_image" else int(config.proposals_per_image)


def _draw_crops(
    height: int, width: int, config: SoCoViewsConfig, generator: torch.Generator
) -> dict[str, tuple[int, int, int, int]]:
    """One draw of every random crop: V2's, and independent V3's and V4's when those exist."""
    names = ["v2"]
    if config.use_v3 and config.v3_mode == "independent":
        names.append("v3")
    if config.use_v4:
        names.append("v4")
    return {name: random_resized_crop(height, width, config.crop_scale, config.crop_ratio, generator) for name in names}


def _candidate_boxes(proposals: torch.Tensor | np.ndarray, height: int, width: int, config: SoCoViewsConfig,
                     generator: torch.Generator) -> torch.Tensor:
    """The (N, 4) float32 boxes views choose from: the proposals, or random boxes for box_source "random"."""
    if config.box_source == "random":
        proposals = random_image_boxes(RANDOM_CANDIDATES, width, height, generator)
    elif isinstance(proposals, np.ndarray):
        # A copy: store arrays are read-only memory maps, which torch refuses to wrap silently.
        proposals = torch.from_numpy(np.array(proposals, dtype=np.float32))
    return proposals.to(torch.float32).reshape(-1, 4)


def _overlapping_crops(height: int, width: int, candidates: torch.Tensor, uses_candidates: bool,
                       config: SoCoViewsConfig, generator: torch.Generator) -> tuple[dict, tuple, torch.Tensor]:
    """(crops by view name, their common region, which candidates overlap every crop).

    Retries re-draw the crops until some candidate box overlaps every crop.
    """
    for _ in range(config.crop_retries + 1):
        crops = _draw_crops(height, width, config, generator)
        shared = intersection([crop_region(c) for c in crops.values()])
        overlapping = torch.ones(len(candidates), dtype=torch.bool)
        for crop in crops.values():
            overlapping &= overlaps(candidates, crop_region(crop))
        found = bool(overlapping.any()) if uses_candidates else True
        if found:
            break
    if not found and is_empty(shared):
        # Crops with no common pixel could hold no common box: the extra crops take V2's.
        crops = {name: crops["v2"] for name in crops}
        shared = crop_region(crops["v2"])
        overlapping = overlaps(candidates, shared)
    return crops, shared, overlapping


def _view_params(height: int, width: int, crops: dict, config: SoCoViewsConfig,
                 generator: torch.Generator) -> dict[str, ViewParams]:
    """Every view's crop, flip and size (the flips drawn here, V1's first, the downsampled V3's last)."""
    flips = {name: bernoulli(generator, config.flip_prob) for name in ["v1", *crops]}
    params: dict[str, ViewParams] = {"v1": ViewParams("v1", 0, 0, height, width, flips["v1"], config.v1_size)}
    for name, (top, left, crop_h, crop_w) in crops.items():
        size = {"v2": config.v2_size, "v3": config.v3_size, "v4": config.v4_size}[name]
        params[name] = ViewParams(name, top, left, crop_h, crop_w, flips[name], size)
    if config.use_v3 and config.v3_mode == "downsample":
        # V3 is V2 downsampled, with its own flip: every view is flipped independently (BYOL pipeline).
        v2 = params["v2"]
        v3_flip = bernoulli(generator, config.flip_prob)
        params["v3"] = ViewParams("v3", v2.top, v2.left, v2.height, v2.width, v3_flip, config.v3_size)
    return params


def _pick_boxes(candidates: torch.Tensor, overlapping: torch.Tensor, shared: tuple, uses_candidates: bool,
                count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(proposals_per_image boxes in original pixels, the candidate row each came from or -1), overlapping candidates at random."""
    if not uses_candidates:
        boxes = torch.zeros((1, 4), dtype=torch.float32)  # replaced by each full view later
        return boxes, torch.full((1,), -1, dtype=torch.int64)
    rows = torch.nonzero(overlapping).flatten()
    if not len(rows):
        return torch.tensor([shared], dtype=torch.float32).repeat(count, 1), torch.full((count,), -1, dtype=torch.int64)
    picked = rows[torch.randperm(len(rows), generator=generator)[:count]]
    rows = picked[torch.arange(count) % len(picked)]  # pad to proposals_per_image by cycling the picked ones
    return candidates[rows], rows.to(torch.int64)


def _geometric_views(image: torch.Tensor, boxes: torch.Tensor, v1_boxes: torch.Tensor, names: list[str],
                     params: dict[str, ViewParams], config: SoCoViewsConfig) -> dict[str, tuple]:
    """Each view's uint8 pixels and boxes after crop, resize and flip (no colour yet)."""
    canvas = tuple(image.shape[-2:])
    downsampled_v3 = "v3" in names and config.v3_mode == "downsample"
    geometric: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        if name == "v3" and downsampled_v3:
            continue
        source_boxes = v1_boxes if name == "v1" else boxes
        wrapped = tv_tensors.BoundingBoxes(source_boxes, format="XYXY", canvas_size=canvas, clamping_mode="hard")
        geometric[name] = crop_resize_flip(image, wrapped, params[name])
    if downsampled_v3:
        # The paper's V3 is V2 itself downsampled: same crop, boxes scaled by v3/v2, mirrored when
        # V3's own flip differs from V2's.
        v2_image, v2_boxes = geometric["v2"]
        size = [config.v3_size, config.v3_size]
        v3_image = F.resize(v2_image, size, antialias=True)
        v3_boxes = F.clamp_bounding_boxes(F.resize(v2_boxes, size))
        if params["v3"].flip != params["v2"].flip:
            v3_image, v3_boxes = F.horizontal_flip(v3_image), F.horizontal_flip(v3_boxes)
        geometric["v3"] = (v3_image, v3_boxes)
    return geometric


def _finished_views(geometric: dict[str, tuple], names: list[str], params: dict[str, ViewParams],
                    config: SoCoViewsConfig, use_color: bool, generator: torch.Generator) -> tuple[list, list]:
    """(normalised float views, their float32 boxes): colour, whole-view boxes and cut-out, view by view."""
    views, view_boxes = [], []
    for name in names:
        view_image, boxes_in_view = geometric[name]
        pixels = F.to_dtype(view_image.as_subclass(torch.Tensor), torch.float32, scale=True)
        if use_color:
            first = name == "v1"
            color = draw_color_params(
                generator,
                BLUR_PROB_V1 if first else BLUR_PROB_OTHERS,
                0.0 if first else SOLARIZE_PROB_OTHERS,
            )
            pixels = apply_color(pixels, color, config.blur_kernel)
        if config.box_source == "whole_image":
            side = float(params[name].size)
            boxes_out = torch.tensor([[0.0, 0.0, side, side]])
        else:
            boxes_out = boxes_in_view.as_subclass(torch.Tensor).to(torch.float32)
        view = normalize(pixels)
        if config.box_cutout and name != "v1":
            view = cut_out_boxes(view, boxes_out, generator, config.cutout_prob, tuple(config.cutout_area))
        views.append(view)
        view_boxes.append(boxes_out)
    return views, view_boxes


def make_views(
    image: torch.Tensor | np.ndarray,
    proposals: torch.Tensor | np.ndarray,
    config: SoCoViewsConfig,
    generator: torch.Generator,
    color_augment: bool | None = None,
) -> dict:
    """Make SoCo's views of one image and its (P, 4) x1 y1 x2 y2 proposals in original pixels.

    Returns {"views": [3xSxS float32, normalised], "boxes": [Nx4 float32 in that view's pixels],
    "view_names": [...], "params": [ViewParams], "proposal_ids": (N,) int64 row of the candidate boxes
    each box came from (-1 for a crop-region or whole-image box)}, N = proposals_per_image. With box_source "random" the
    candidates are random boxes over the whole image obeying the proposal filter's rules, chosen
    exactly as proposals are. `color_augment` overrides config.color_augment (False: geometry only).
    The steps draw from `generator` in this order: candidates, crops, flips, boxes, jitter, colour, cut-out.
    """
    use_color = config.color_augment if color_augment is None else color_augment
    image = as_image(image)
    height, width = image.shape[-2:]
    candidates = _candidate_boxes(proposals, height, width, config, generator)
    names = view_names(config)
    uses_candidates = config.box_source in ("proposals", "random")
    crops, shared, overlapping = _overlapping_crops(height, width, candidates, uses_candidates, config, generator)
    params = _view_params(height, width, crops, config, generator)
    boxes, proposal_ids = _pick_boxes(candidates, overlapping, shared, uses_candidates, boxes_per_image(config),
                                      generator)
    v1_boxes = boxes
    if config.box_jitter and config.box_source != "whole_image":
        v1_boxes = jitter_boxes(boxes, config.jitter_prob, config.jitter_ratio, width, height, generator)
    geometric = _geometric_views(image, boxes, v1_boxes, names, params, config)
    views, view_boxes = _finished_views(geometric, names, params, config, use_color, generator)
    return {
        "views": views,
        "boxes": view_boxes,
        "view_names": names,
        "params": [params[name] for name in names],
        "proposal_ids": proposal_ids,
    }


class SoCoTransform:
    """The data set's per-image transform for SoCo: views and boxes as dicts keyed by view name."""

    def __init__(self, config: SoCoViewsConfig):
        self.config = config
        # Only box_source "proposals" reads them; whole-image and random boxes need no store.
        self.needs_proposals = config.box_source == "proposals"

    def __call__(self, image: np.ndarray, proposals: np.ndarray, generator: torch.Generator, source=None) -> dict:
        """{"views": {name: 3xSxS}, "boxes": {name: Nx4}, "proposal_ids": (N,)} (N = proposals_per_image) of one image."""
        out = make_views(image, proposals, self.config, generator)
        return {
            "views": dict(zip(out["view_names"], out["views"])),
            "boxes": dict(zip(out["view_names"], out["boxes"])),
            "proposal_ids": out["proposal_ids"],
        }

    def collate(self, samples: list[dict]) -> dict:
        """Stack samples: views (B, 3, S, S) and boxes (B, N, 4) per view name, proposal ids (B, N)."""
        return stack_samples(samples)
