"""SoCo's sample transform: one image and its proposals become V1, V2, V3 (and SoCo*'s V4) with matching boxes.

Geometry (all in the original image's pixels, boxes x1 y1 x2 y2 with x in [0, W]):
    V1  the whole image resized to v1_size x v1_size (aspect not preserved, as in the release).
    V2  a random resized crop (crop_scale, crop_ratio) of the image, to v2_size.
    V3  "independent" (release, the default): its own random resized crop to v3_size;
        "downsample" (paper): V2's geometric image resized to v3_size (same crop, own flip).
    V4  (use_v4, SoCo*) another random resized crop of the whole image (V1's region), to v4_size.
Every view is flipped horizontally with probability flip_prob, independently. Boxes are clipped to
each view.

Boxes come in sets, one per view pair (V1, Vp) (box_sets "per_pair", the release's
`contrast/data/dataset.py` 697-718): the proposals overlapping Vp's crop, K of them at random (all when
fewer), jittered for V1's copy, each copy padded to K by drawing with replacement from its own boxes
(`bboxs_utils.py` 255-259). So V1 carries one box set per pair ("v1:v2", "v1:v3", ...), and every box
carries the id of the proposal it came from: the loss matches boxes by id, not by row. A V3 that is V2
downsampled shares V2's pair sets (the release's SoCo* does so for its V2-resized view, dataset.py
895-898). box_sets "shared" is this project's earlier design: one K-set overlapping every crop, shared
by all views row for row, padded by cycling.

Every random number comes from the generator handed in, drawn in a fixed order (random candidate
boxes, crops with the box choice, flips, jitter and padding, colour, cut-out), so the same generator state gives bitwise the
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
V3_MODES = ("independent", "downsample")
BOX_SETS = ("per_pair", "shared")
# BYOL's asymmetric colour pipeline: V1 is always blurred and never solarised, the others rarely blurred.
BLUR_PROB_V1 = 1.0
BLUR_PROB_OTHERS = 0.1
SOLARIZE_PROB_OTHERS = 0.2
# Candidate boxes drawn per image for box_source "random" (then chosen like proposals).
RANDOM_CANDIDATES = 32


@config_rules(
    v1_size=at_least(1), v2_size=at_least(1), v3_size=at_least(1), v4_size=at_least(1), v3_mode=one_of(*V3_MODES),
    crop_scale=interval(FRACTION), crop_ratio=interval(POSITIVE), flip_prob=PROBABILITY, crop_retries=at_least(0), box_sets=one_of(*BOX_SETS),
    proposals_per_image=at_least(1), box_source=one_of(*BOX_SOURCES), jitter_prob=PROBABILITY,
    jitter_ratio=Range(0.0, 1.0, high_open=True), blur_kernel=one_of(*BLUR_KERNEL_RULES), cutout_prob=PROBABILITY,
    cutout_area=interval(FRACTION),
)
@dataclass
class SoCoViewsConfig:
    """How SoCo's views and their boxes are made (sizes in pixels; the release's by default)."""

    v1_size: int = 224  # V1: the whole image, resized (aspect not preserved, as in the release)
    v2_size: int = 224  # V2: random resized crop
    v3_size: int = 112  # V3: its own crop (release) or V2 downsampled (paper), see v3_mode
    v4_size: int = 192  # V4 (SoCo* only): another random crop of V1
    use_v3: bool = True  # Table 4 "multi view"; off: V1 and V2 only
    use_v4: bool = False  # SoCo*
    # "independent": the release's own 112 crop (contrast/data/transform.py 80, RandomResizedCropParams(image_size//2));
    # "downsample": the paper's text (V2 resized to 112)
    v3_mode: str = "independent"
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    flip_prob: float = 0.5
    # re-draws of the crops when too few proposals overlap them: the release draws at most --max_tries 5 times
    # (contrast/option.py 136), needing max(K // 2, 1) boxes per pair, then half as many each try (dataset.py 689-709)
    crop_retries: int = 4
    box_sets: str = "per_pair"  # "per_pair" (release) or "shared" (one K-set for every view, row-aligned)
    proposals_per_image: int = 4  # the paper's K: boxes every view carries
    box_source: str = "proposals"  # "proposals", "random" (Table 5c) or "whole_image" (image-level BYOL)
    box_jitter: bool = True
    jitter_prob: float = 0.5
    jitter_ratio: float = 0.1
    color_augment: bool = True  # the BYOL colour pipeline
    blur_kernel: str = "sigma"  # "sigma": covers +-3 sigma; "tenth": 10% of the view side (SimCLR, BYOL)
    # The cut-out inside boxes on V2/V3 of the release's 100-epoch script (ImageAsymBboxAwareMultiJitter1Cutout).
    # Off: as released it stops at its first cut (random.randint on float corners, transform_ops.py 357, raises
    # ValueError); the FPN 400-epoch scripts do not use it, and the C4 scripts that do fail before (TypeError).
    box_cutout: bool = False
    cutout_prob: float = 0.5  # per box
    cutout_area: list[float] = field(default_factory=lambda: [0.1, 0.3])  # share of the box area erased


def view_names(config: SoCoViewsConfig) -> list[str]:
    """Names of the views `make_views` returns for this configuration, in order."""
    return ["v1", "v2"] + (["v3"] if config.use_v3 else []) + (["v4"] if config.use_v4 else [])


def paired_views(config: SoCoViewsConfig) -> list[str]:
    """The views each paired with V1 (V1 carries one box set per such pair)."""
    return view_names(config)[1:]


def v1_set_name(view: str) -> str:
    """The name of V1's box set for the pair (V1, view): "v1:v2", "v1:v3", ..."""
    return f"v1:{view}"


def _views_with_own_v1_set(config: SoCoViewsConfig) -> list[str]:
    """The paired views whose pair draws its own V1 box set: each own crop's (per_pair), or V2's alone (shared)."""
    if config.box_sets == "shared":
        return ["v2"]
    return [view for view in paired_views(config) if not (view == "v3" and config.v3_mode == "downsample")]


def pair_box_sets(config: SoCoViewsConfig) -> list[tuple[str, str]]:
    """(V1's set, the other view's set) of each pair; a downsampled V3, or box_sets "shared", uses V1's set of V2."""
    own = _views_with_own_v1_set(config)
    return [(v1_set_name(view if view in own else "v2"), view) for view in paired_views(config)]


def box_set_names(config: SoCoViewsConfig) -> list[str]:
    """Every box set a sample carries, each once: v1:v2, v2, v1:v3, v3, ... (V1's set before its pair's view's)."""
    own = _views_with_own_v1_set(config)
    return [name for view in paired_views(config) for name in ([v1_set_name(view)] if view in own else []) + [view]]


def boxes_per_image(config: SoCoViewsConfig) -> int:
    """proposals_per_image, the number of box rows every set carries (1 for the image-level "whole_image" baseline)."""
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
    candidates = proposals.to(torch.float32).reshape(-1, 4)
    if not len(candidates) and config.box_sets == "per_pair":
        # The release's image without proposals: the whole image is its one proposal (dataset.py 681-682).
        candidates = torch.tensor([[0.0, 0.0, float(width), float(height)]])
    return candidates


def _choose_rows(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """The release's select_props "random" (props_utils.py 12-21): all rows when fewer than count, else count of them
    at random without replacement."""
    if len(rows) < count:
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:count]]


def _crops_for_pairs(height: int, width: int, candidates: torch.Tensor, uses_candidates: bool,
                     config: SoCoViewsConfig, generator: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    """(crops by view name, the candidate rows chosen for each crop's pair with V1), the release's way.

    V1 is the whole image, so the proposals a pair may use are those overlapping the other view's crop. The crops
    are drawn again while some pair has fewer than `least_common` boxes, which starts at max(K // 2, 1) and halves
    with every try (dataset.py 689-709); after the last try the last draw stands, even with no box.
    """
    count = boxes_per_image(config)
    least_common = max(count // 2, 1)
    for _ in range(config.crop_retries + 1):
        crops = _draw_crops(height, width, config, generator)
        chosen = {}
        for view, crop in crops.items():
            rows = torch.nonzero(overlaps(candidates, crop_region(crop))).flatten()
            chosen[view] = _choose_rows(rows, count, generator) if uses_candidates else rows[:0]
        if not uses_candidates or all(len(rows) >= least_common for rows in chosen.values()):
            break
        least_common = max(least_common // 2, 1)
    return crops, chosen


def _padded(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Indices into `rows` padded to `count`: each index once, then draws with replacement (the release's
    pad_bboxs_with_common, bboxs_utils.py 255-259; every chosen box is common to both views of a pair)."""
    extra = torch.randint(len(rows), (count - len(rows),), generator=generator) if count > len(rows) else rows[:0]
    return torch.cat([torch.arange(len(rows)), extra])


def _per_pair_sets(candidates: torch.Tensor, chosen: dict[str, torch.Tensor], crops: dict, image_size: tuple[int, int],
                   config: SoCoViewsConfig, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{set name: ((K, 4) boxes in original pixels, (K,) ids)}: for each pair, V1's jittered copy and the other
    view's, each padded on its own; id -1 marks the whole-frame box of a pair no proposal overlaps."""
    height, width = image_size
    count = boxes_per_image(config)
    sets = {}
    for view, rows in chosen.items():
        if not len(rows):
            # Nothing to clip: the release's clip_bboxs gives each view its whole frame, one id (bboxs_utils.py 67).
            whole = torch.tensor([[0.0, 0.0, float(width), float(height)]]).repeat(count, 1)
            ids = torch.full((count,), -1, dtype=torch.int64)
            sets[v1_set_name(view)] = (whole, ids)
            sets[view] = (torch.tensor([crop_region(crops[view])], dtype=torch.float32).repeat(count, 1), ids)
            continue
        boxes = candidates[rows]
        v1_boxes = boxes
        if config.box_jitter and config.box_source != "whole_image":
            v1_boxes = jitter_boxes(boxes, config.jitter_prob, config.jitter_ratio, width, height, generator)
        v1_index, view_index = _padded(rows, count, generator), _padded(rows, count, generator)
        sets[v1_set_name(view)] = (v1_boxes[v1_index], rows[v1_index].to(torch.int64))
        sets[view] = (boxes[view_index], rows[view_index].to(torch.int64))
    return sets


def _overlapping_crops(height: int, width: int, candidates: torch.Tensor, uses_candidates: bool,
                       config: SoCoViewsConfig, generator: torch.Generator) -> tuple[dict, tuple, torch.Tensor]:
    """box_sets "shared": (crops by view name, their common region, which candidates overlap every crop).

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


def _pick_boxes(candidates: torch.Tensor, overlapping: torch.Tensor, shared: tuple, uses_candidates: bool,
                count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """box_sets "shared": (K boxes in original pixels, the candidate row each came from or -1), overlapping
    candidates at random, padded by cycling."""
    if not uses_candidates:
        boxes = torch.zeros((1, 4), dtype=torch.float32)  # replaced by each full view later
        return boxes, torch.full((1,), -1, dtype=torch.int64)
    rows = torch.nonzero(overlapping).flatten()
    if not len(rows):
        return torch.tensor([shared], dtype=torch.float32).repeat(count, 1), torch.full((count,), -1, dtype=torch.int64)
    picked = rows[torch.randperm(len(rows), generator=generator)[:count]]
    rows = picked[torch.arange(count) % len(picked)]
    return candidates[rows], rows.to(torch.int64)


def _shared_sets(candidates: torch.Tensor, overlapping: torch.Tensor, shared: tuple, uses_candidates: bool,
                 image_size: tuple[int, int], config: SoCoViewsConfig,
                 generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """box_sets "shared": one K-set, jittered once for V1, the same rows in every pair."""
    height, width = image_size
    boxes, ids = _pick_boxes(candidates, overlapping, shared, uses_candidates, boxes_per_image(config), generator)
    v1_boxes = boxes
    if config.box_jitter and config.box_source != "whole_image":
        v1_boxes = jitter_boxes(boxes, config.jitter_prob, config.jitter_ratio, width, height, generator)
    return {v1_set_name("v2"): (v1_boxes, ids), **{view: (boxes, ids) for view in paired_views(config)}}


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


def _geometric_views(image: torch.Tensor, sets: dict[str, tuple], names: list[str], params: dict[str, ViewParams],
                     config: SoCoViewsConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({view: uint8 pixels}, {set name: boxes in its view's pixels}) after crop, resize and flip (no colour yet)."""
    canvas = tuple(image.shape[-2:])
    downsampled_v3 = "v3" in names and config.v3_mode == "downsample"
    pixels: dict[str, torch.Tensor] = {}
    view_boxes: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "v3" and downsampled_v3:
            continue
        # V1 carries every pair's set: one geometric pass over them all, split back.
        set_names = [set_name for set_name in sets if set_name.startswith("v1:")] if name == "v1" else [name]
        stacked = torch.cat([sets[set_name][0] for set_name in set_names])
        wrapped = tv_tensors.BoundingBoxes(stacked, format="XYXY", canvas_size=canvas, clamping_mode="hard")
        pixels[name], moved = crop_resize_flip(image, wrapped, params[name])
        for set_name, part in zip(set_names, moved.split([len(sets[s][0]) for s in set_names])):
            view_boxes[set_name] = part
    if downsampled_v3:
        # The paper's V3 is V2 itself downsampled: same crop and box set, boxes scaled by v3/v2, mirrored when
        # V3's own flip differs from V2's.
        size = [config.v3_size, config.v3_size]
        v3_image = F.resize(pixels["v2"], size, antialias=True)
        v2_side = params["v2"].size
        v2_boxes = tv_tensors.BoundingBoxes(view_boxes["v2"], format="XYXY", canvas_size=(v2_side, v2_side),
                                            clamping_mode="hard")
        v3_boxes = F.clamp_bounding_boxes(F.resize(v2_boxes, size))
        if params["v3"].flip != params["v2"].flip:
            v3_image, v3_boxes = F.horizontal_flip(v3_image), F.horizontal_flip(v3_boxes)
        pixels["v3"], view_boxes["v3"] = v3_image, v3_boxes
    return pixels, view_boxes


def _finished_views(pixels: dict, view_boxes: dict, names: list[str], params: dict[str, ViewParams],
                    config: SoCoViewsConfig, use_color: bool, generator: torch.Generator) -> tuple[list, dict]:
    """(normalised float views, {set name: float32 boxes}): colour, whole-view boxes and cut-out, view by view."""
    views, boxes_out = [], {}
    for name in names:
        view = F.to_dtype(pixels[name].as_subclass(torch.Tensor), torch.float32, scale=True)
        if use_color:
            first = name == "v1"
            color = draw_color_params(
                generator,
                BLUR_PROB_V1 if first else BLUR_PROB_OTHERS,
                0.0 if first else SOLARIZE_PROB_OTHERS,
            )
            view = apply_color(view, color, config.blur_kernel)
        view = normalize(view)
        set_names = [set_name for set_name in view_boxes if set_name.startswith("v1:")] if name == "v1" else [name]
        for set_name in set_names:
            if config.box_source == "whole_image":
                side = float(params[name].size)
                boxes_out[set_name] = torch.tensor([[0.0, 0.0, side, side]])
            else:
                boxes_out[set_name] = view_boxes[set_name].as_subclass(torch.Tensor).to(torch.float32)
        if config.box_cutout and name != "v1":
            view = cut_out_boxes(view, boxes_out[name], generator, config.cutout_prob, tuple(config.cutout_area))
        views.append(view)
    return views, boxes_out


def make_views(
    image: torch.Tensor | np.ndarray,
    proposals: torch.Tensor | np.ndarray,
    config: SoCoViewsConfig,
    generator: torch.Generator,
    color_augment: bool | None = None,
) -> dict:
    """Make SoCo's views of one image and its (P, 4) x1 y1 x2 y2 proposals in original pixels.

    Returns {"views": [3xSxS float32, normalised], "view_names": [...], "params": [ViewParams], "boxes": {set name:
    (K, 4) float32 in its view's pixels}, "box_ids": {set name: (K,) int64 row of the candidate box each box came
    from, -1 for a crop-region or whole-frame box}}, K = proposals_per_image, the set names of `box_set_names`.
    With box_source "random" the candidates are random boxes over the whole image obeying the proposal filter's
    rules, chosen exactly as proposals are. `color_augment` overrides config.color_augment (False: geometry only).
    The steps draw from `generator` in this order: candidates, crops (with the box choice per pair), flips, jitter
    and padding, colour, cut-out.
    """
    use_color = config.color_augment if color_augment is None else color_augment
    image = as_image(image)
    height, width = image.shape[-2:]
    candidates = _candidate_boxes(proposals, height, width, config, generator)
    names = view_names(config)
    uses_candidates = config.box_source in ("proposals", "random")
    if config.box_sets == "per_pair":
        crops, chosen = _crops_for_pairs(height, width, candidates, uses_candidates, config, generator)
        params = _view_params(height, width, crops, config, generator)
        sets = _per_pair_sets(candidates, chosen, crops, (height, width), config, generator)
    else:
        crops, shared, overlapping = _overlapping_crops(height, width, candidates, uses_candidates, config, generator)
        params = _view_params(height, width, crops, config, generator)
        sets = _shared_sets(candidates, overlapping, shared, uses_candidates, (height, width), config, generator)
    pixels, view_boxes = _geometric_views(image, sets, names, params, config)
    views, boxes = _finished_views(pixels, view_boxes, names, params, config, use_color, generator)
    ids = {name: sets[name][1] for name in sets}
    if "v3" in names and config.v3_mode == "downsample":
        ids["v3"] = ids["v2"]  # V3 is V2 resized: V2's boxes, scaled
    if config.box_source == "whole_image":
        ids = {name: torch.zeros(1, dtype=torch.int64) for name in box_set_names(config)}
    return {
        "views": views,
        "view_names": names,
        "params": [params[name] for name in names],
        "boxes": {name: boxes[name] for name in box_set_names(config)},
        "box_ids": {name: ids[name] for name in box_set_names(config)},
    }


class SoCoTransform:
    """The data set's per-image transform for SoCo: views by view name, box sets and their ids by set name."""

    def __init__(self, config: SoCoViewsConfig):
        self.config = config
        # Only box_source "proposals" reads them; whole-image and random boxes need no store.
        self.needs_proposals = config.box_source == "proposals"

    def __call__(self, image: np.ndarray, proposals: np.ndarray, generator: torch.Generator, source=None) -> dict:
        """{"views": {name: 3xSxS}, "boxes": {set: Kx4}, "box_ids": {set: (K,)}} of one image."""
        out = make_views(image, proposals, self.config, generator)
        return {"views": dict(zip(out["view_names"], out["views"])), "boxes": out["boxes"], "box_ids": out["box_ids"]}

    def collate(self, samples: list[dict]) -> dict:
        """Stack samples: views (B, 3, S, S) per view name, boxes (B, K, 4) and ids (B, K) per set name."""
        return stack_samples(samples)
