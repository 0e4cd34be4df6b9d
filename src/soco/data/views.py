"""SoCo's training views: one image and its proposals become V1, V2, V3 (and V4) with matching boxes.

Geometry (all in the original image's pixels, boxes x1 y1 x2 y2 with x in [0, W]):
    V1  the whole image resized to v1_size x v1_size (aspect not preserved).
    V2  a random resized crop (crop_scale, crop_ratio) of the image, to v2_size.
    V3  "downsample" (paper): V2's geometric image resized to v3_size (same crop, same flip);
        "independent" (release): its own random resized crop to v3_size.
    V4  (use_v4, SoCo*) another random resized crop of the whole image (V1's region), to v4_size.
Every view is flipped horizontally with probability flip_prob, independently (V3 "downsample"
inherits V2's flip). Images and boxes go through the same torchvision v2 kernels, so a box follows
its pixels; boxes are clipped to each view. Row i of every view's boxes is the same object.

Every random number comes from the `torch.Generator` given to `make_views`, drawn in a fixed order
(crops, flips, boxes, jitter, then colour), so the same generator state gives bitwise the same views,
and turning colour off leaves the geometry of a seed unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from soco.config.schema import ViewsConfig
from soco.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BOX_SOURCES",
    "V3_MODES",
    "ViewParams",
    "check_views_config",
    "view_names",
    "boxes_per_image",
    "make_views",
    "jitter_boxes",
    "random_boxes",
    "denormalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BOX_SOURCES = ("proposals", "random", "whole_image")
V3_MODES = ("downsample", "independent")

# The BYOL colour pipeline: ColorJitter(brightness, contrast, saturation, hue) and probabilities.
_JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)
_JITTER_PROB = 0.8
_GRAYSCALE_PROB = 0.2
_BLUR_SIGMA = (0.1, 2.0)
_BLUR_PROB_V1 = 1.0
_BLUR_PROB_OTHERS = 0.1
_SOLARIZE_PROB_OTHERS = 0.2
_SOLARIZE_THRESHOLD = 0.5

# Random boxes (box_source "random"): side relative to the shared region's geometric mean side,
# and aspect w/h, chosen to resemble what the proposal filter keeps.
_RANDOM_BOX_SIDE = (0.1, 0.8)
_RANDOM_BOX_ASPECT = (1.0 / 3.0, 3.0)

# RandomResizedCrop's own number of tries before it falls back to a central crop.
_CROP_SAMPLING_TRIES = 10


@dataclass(frozen=True)
class ViewParams:
    """Where one view comes from: crop (top, left, height, width) in original pixels, flip, output side."""

    name: str
    top: int
    left: int
    height: int
    width: int
    flip: bool
    size: int

    @property
    def region(self) -> tuple[int, int, int, int]:
        """The cropped region as x1 y1 x2 y2 in original pixels."""
        return (self.left, self.top, self.left + self.width, self.top + self.height)


def check_views_config(config: ViewsConfig) -> None:
    """Raise ConfigError for values of the views section that make no sense."""
    if config.box_source not in BOX_SOURCES:
        raise ConfigError(f"views.box_source must be one of {', '.join(BOX_SOURCES)}, not {config.box_source!r}")
    if config.v3_mode not in V3_MODES:
        raise ConfigError(f"views.v3_mode must be one of {', '.join(V3_MODES)}, not {config.v3_mode!r}")
    for key in ("v1_size", "v2_size", "v3_size", "v4_size", "proposals_per_image"):
        if int(getattr(config, key)) < 1:
            raise ConfigError(f"views.{key} must be at least 1, not {getattr(config, key)}")
    if config.crop_retries < 0:
        raise ConfigError(f"views.crop_retries must be >= 0, not {config.crop_retries}")
    for key in ("crop_scale", "crop_ratio"):
        low, high = getattr(config, key)
        if not (0 < low <= high):
            raise ConfigError(f"views.{key} must be [low, high] with 0 < low <= high, not {getattr(config, key)}")
    if config.crop_scale[1] > 1:
        raise ConfigError(f"views.crop_scale must not exceed 1, not {config.crop_scale}")
    for key in ("flip_prob", "jitter_prob"):
        if not 0 <= getattr(config, key) <= 1:
            raise ConfigError(f"views.{key} must be a probability in [0, 1], not {getattr(config, key)}")
    if not 0 <= config.jitter_ratio < 1:
        raise ConfigError(f"views.jitter_ratio must be in [0, 1), not {config.jitter_ratio}")


def view_names(config: ViewsConfig) -> list[str]:
    """Names of the views `make_views` returns for this configuration, in order."""
    return ["v1", "v2"] + (["v3"] if config.use_v3 else []) + (["v4"] if config.use_v4 else [])


def boxes_per_image(config: ViewsConfig) -> int:
    """K, the number of box rows every view carries (1 for the image-level "whole_image" baseline)."""
    return 1 if config.box_source == "whole_image" else int(config.proposals_per_image)


def _uniform(generator: torch.Generator, low: float, high: float, count: int | None = None) -> torch.Tensor | float:
    """Uniform draw(s) in [low, high) from `generator` (float64, so crop sizes match torchvision's math)."""
    shape = (1,) if count is None else (count,)
    values = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    return float(values[0]) if count is None else values


def _bernoulli(generator: torch.Generator, probability: float) -> bool:
    """One coin with P(True) = probability; always draws, so the stream does not depend on p."""
    return bool(torch.rand(1, generator=generator, dtype=torch.float64)[0] < probability)


def _random_resized_crop(
    height: int, width: int, scale: list[float], ratio: list[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it, but from `generator`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_SAMPLING_TRIES):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, *log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator)[0])
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator)[0])
            return top, left, crop_h, crop_w
    # Same fallback as torchvision: a central crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    crop_w, crop_h = max(1, min(crop_w, width)), max(1, min(crop_h, height))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _overlaps(boxes: torch.Tensor, region: tuple[float, float, float, float]) -> torch.Tensor:
    """(N,) bool: which x1 y1 x2 y2 boxes overlap `region` with positive area."""
    x1, y1, x2, y2 = (float(v) for v in region)
    inter_w = boxes[:, 2].clamp(max=x2) - boxes[:, 0].clamp(min=x1)
    inter_h = boxes[:, 3].clamp(max=y2) - boxes[:, 1].clamp(min=y1)
    return (inter_w > 0) & (inter_h > 0)


def _intersection(regions: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """The common part of x1 y1 x2 y2 regions (may be empty: x2 <= x1 or y2 <= y1)."""
    return (
        max(r[0] for r in regions),
        max(r[1] for r in regions),
        min(r[2] for r in regions),
        min(r[3] for r in regions),
    )


def _is_empty(region: tuple[int, int, int, int]) -> bool:
    """Whether an x1 y1 x2 y2 region has no area."""
    return region[2] <= region[0] or region[3] <= region[1]


def jitter_boxes(
    boxes: torch.Tensor,
    probability: float,
    ratio: float,
    image_width: int,
    image_height: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """SoCo's box jitter: each box, with `probability`, moves and resizes by U(-ratio, ratio) of its size.

    x1' = x1 + j0*w, y1' = y1 + j1*h, w' = w*(1+j2), h' = h*(1+j3), then clipped to the image.
    """
    count = boxes.shape[0]
    # Both draws happen for every box, so the stream consumed does not depend on the outcome.
    chosen = torch.rand(count, generator=generator, dtype=torch.float64) < probability
    offsets = (torch.rand((count, 4), generator=generator, dtype=torch.float64) * 2 - 1) * ratio
    original = boxes.to(torch.float64)
    widths = original[:, 2] - original[:, 0]
    heights = original[:, 3] - original[:, 1]
    x1 = original[:, 0] + offsets[:, 0] * widths
    y1 = original[:, 1] + offsets[:, 1] * heights
    x2 = x1 + widths * (1 + offsets[:, 2])
    y2 = y1 + heights * (1 + offsets[:, 3])
    jittered = torch.stack([x1, y1, x2, y2], dim=1)
    jittered[:, 0::2] = jittered[:, 0::2].clamp(0, image_width)
    jittered[:, 1::2] = jittered[:, 1::2].clamp(0, image_height)
    return torch.where(chosen[:, None], jittered, original).to(boxes.dtype)


def random_boxes(count: int, region: tuple[int, int, int, int], generator: torch.Generator) -> torch.Tensor:
    """`count` random boxes inside `region` (x1 y1 x2 y2), for the "random boxes" ablation.

    Centre uniform in the region; side s ~ U(0.1, 0.8) of the region's geometric mean side;
    aspect a = w/h log-uniform in [1/3, 3] (w = s*sqrt(a), h = s/sqrt(a)); clipped to the region.
    """
    x1, y1, x2, y2 = (float(v) for v in region)
    mean_side = math.sqrt((x2 - x1) * (y2 - y1))
    centre_x = _uniform(generator, x1, x2, count)
    centre_y = _uniform(generator, y1, y2, count)
    side = _uniform(generator, *_RANDOM_BOX_SIDE, count) * mean_side
    aspect = torch.exp(_uniform(generator, math.log(_RANDOM_BOX_ASPECT[0]), math.log(_RANDOM_BOX_ASPECT[1]), count))
    half_w = side * aspect.sqrt() / 2
    half_h = side / aspect.sqrt() / 2
    boxes = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(x1, x2)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(y1, y2)
    return boxes.to(torch.float32)


def _as_image(image: torch.Tensor | np.ndarray) -> tv_tensors.Image:
    """A 3xHxW tv_tensors.Image from a CxHxW tensor or an HxWxC numpy array (gray is repeated to RGB)."""
    if isinstance(image, np.ndarray):
        array = image if image.ndim == 3 else image[..., None]
        array = np.ascontiguousarray(array) if array.flags.writeable else np.array(array)
        image = torch.from_numpy(array).permute(2, 0, 1)
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape CxHxW, got {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.shape[0] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {image.shape[0]}")
    return tv_tensors.Image(image)


def _geometry(
    image: tv_tensors.Image, boxes: tv_tensors.BoundingBoxes, params: ViewParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop, resize and flip an image and its boxes together; boxes are clipped to the view."""
    size = [params.size, params.size]
    view_image = F.resized_crop(image, params.top, params.left, params.height, params.width, size, antialias=True)
    view_boxes = F.resized_crop(boxes, params.top, params.left, params.height, params.width, size)
    if params.flip:
        view_image = F.horizontal_flip(view_image)
        view_boxes = F.horizontal_flip(view_boxes)
    # Float rounding in resize and flip can leave a coordinate a hair outside the view.
    return view_image, F.clamp_bounding_boxes(view_boxes)


def _color_params(generator: torch.Generator, blur_prob: float, solarize_prob: float) -> dict:
    """Draw one view's colour augmentation (every draw always happens, so the stream length is fixed)."""
    brightness, contrast, saturation, hue = _JITTER_STRENGTH
    return {
        "jitter": _bernoulli(generator, _JITTER_PROB),
        "order": torch.randperm(4, generator=generator).tolist(),
        "brightness": _uniform(generator, 1 - brightness, 1 + brightness),
        "contrast": _uniform(generator, 1 - contrast, 1 + contrast),
        "saturation": _uniform(generator, 1 - saturation, 1 + saturation),
        "hue": _uniform(generator, -hue, hue),
        "grayscale": _bernoulli(generator, _GRAYSCALE_PROB),
        "blur": _bernoulli(generator, blur_prob),
        "sigma": _uniform(generator, *_BLUR_SIGMA),
        "solarize": _bernoulli(generator, solarize_prob),
    }


def _blur_kernel_size(side: int) -> int:
    """Odd Gaussian kernel about 10% of the view side (23 at 224, as in BYOL), at least 3."""
    kernel = max(3, int(0.1 * side))
    return kernel if kernel % 2 else kernel + 1


def _apply_color(image: torch.Tensor, params: dict) -> torch.Tensor:
    """The BYOL colour pipeline on a float [0, 1] image, with parameters drawn beforehand."""
    if params["jitter"]:
        for op in params["order"]:
            if op == 0:
                image = F.adjust_brightness(image, params["brightness"])
            elif op == 1:
                image = F.adjust_contrast(image, params["contrast"])
            elif op == 2:
                image = F.adjust_saturation(image, params["saturation"])
            else:
                image = F.adjust_hue(image, params["hue"])
    if params["grayscale"]:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if params["blur"]:
        kernel = _blur_kernel_size(image.shape[-1])
        image = F.gaussian_blur(image, [kernel, kernel], [params["sigma"], params["sigma"]])
    if params["solarize"]:
        image = F.solarize(image, _SOLARIZE_THRESHOLD)
    return image


def denormalize(view: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of a (..., 3, H, W) view: float RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=view.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=view.dtype).view(3, 1, 1)
    return (view * std + mean).clamp(0, 1)


def _draw_crops(
    height: int, width: int, config: ViewsConfig, generator: torch.Generator
) -> dict[str, tuple[int, int, int, int]]:
    """One draw of every random crop: V2's, and independent V3's and V4's when those exist."""
    names = ["v2"]
    if config.use_v3 and config.v3_mode == "independent":
        names.append("v3")
    if config.use_v4:
        names.append("v4")
    return {
        name: _random_resized_crop(height, width, config.crop_scale, config.crop_ratio, generator) for name in names
    }


def _crop_region(crop: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) as x1 y1 x2 y2."""
    top, left, crop_h, crop_w = crop
    return (left, top, left + crop_w, top + crop_h)


def make_views(
    image: torch.Tensor | np.ndarray,
    proposals: torch.Tensor | np.ndarray,
    config: ViewsConfig,
    generator: torch.Generator,
    color_augment: bool | None = None,
) -> dict:
    """Make SoCo's views of one image and its (N, 4) x1 y1 x2 y2 proposals in original pixels.

    Returns {"views": [3xSxS float32, normalised], "boxes": [Kx4 float32 in that view's pixels],
    "view_names": [...], "params": [ViewParams], "proposal_ids": (K,) int64 row of `proposals`
    each box came from (-1 for a crop-region, random or whole-image box)}. `color_augment`
    overrides config.color_augment (False: geometry only, still normalised).
    """
    check_views_config(config)
    use_color = config.color_augment if color_augment is None else color_augment
    image = _as_image(image)
    height, width = image.shape[-2:]
    if isinstance(proposals, np.ndarray):
        # A copy: store arrays are read-only memory maps, which torch refuses to wrap silently.
        proposals = torch.from_numpy(np.array(proposals, dtype=np.float32))
    proposals = proposals.to(torch.float32).reshape(-1, 4)
    count = boxes_per_image(config)
    names = view_names(config)

    # Crops first: retries re-draw them until some proposal overlaps every crop.
    for _ in range(config.crop_retries + 1):
        crops = _draw_crops(height, width, config, generator)
        shared = _intersection([_crop_region(c) for c in crops.values()])
        overlapping = torch.ones(len(proposals), dtype=torch.bool)
        for crop in crops.values():
            overlapping &= _overlaps(proposals, _crop_region(crop))
        if config.box_source == "proposals":
            found = bool(overlapping.any())
        else:
            found = config.box_source == "whole_image" or not _is_empty(shared)
        if found:
            break
    if not found and _is_empty(shared):
        # Crops with no common pixel could hold no common box: the extra crops take V2's.
        crops = {name: crops["v2"] for name in crops}
        shared = _crop_region(crops["v2"])
        overlapping = _overlaps(proposals, shared)

    flips = {name: _bernoulli(generator, config.flip_prob) for name in ["v1", *crops]}
    params: dict[str, ViewParams] = {"v1": ViewParams("v1", 0, 0, height, width, flips["v1"], config.v1_size)}
    for name, (top, left, crop_h, crop_w) in crops.items():
        size = {"v2": config.v2_size, "v3": config.v3_size, "v4": config.v4_size}[name]
        params[name] = ViewParams(name, top, left, crop_h, crop_w, flips[name], size)
    if config.use_v3 and config.v3_mode == "downsample":
        # V3 is V2 downsampled, with its own flip: every view is flipped independently (BYOL pipeline).
        v2 = params["v2"]
        v3_flip = _bernoulli(generator, config.flip_prob)
        params["v3"] = ViewParams("v3", v2.top, v2.left, v2.height, v2.width, v3_flip, config.v3_size)

    if config.box_source == "proposals":
        candidates = torch.nonzero(overlapping).flatten()
        if len(candidates):
            picked = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
            rows = picked[torch.arange(count) % len(picked)]  # pad to K by cycling the picked ones
            boxes = proposals[rows]
            proposal_ids = rows.to(torch.int64)
        else:
            boxes = torch.tensor([shared], dtype=torch.float32).repeat(count, 1)
            proposal_ids = torch.full((count,), -1, dtype=torch.int64)
    elif config.box_source == "random":
        boxes = random_boxes(count, shared, generator)
        proposal_ids = torch.full((count,), -1, dtype=torch.int64)
    else:
        boxes = torch.zeros((1, 4), dtype=torch.float32)  # replaced by each full view below
        proposal_ids = torch.full((1,), -1, dtype=torch.int64)

    v1_boxes = boxes
    if config.box_jitter and config.box_source != "whole_image":
        v1_boxes = jitter_boxes(boxes, config.jitter_prob, config.jitter_ratio, width, height, generator)

    canvas = (height, width)
    geometric: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        if name == "v3" and config.v3_mode == "downsample":
            continue
        source_boxes = v1_boxes if name == "v1" else boxes
        wrapped = tv_tensors.BoundingBoxes(source_boxes, format="XYXY", canvas_size=canvas, clamping_mode="hard")
        geometric[name] = _geometry(image, wrapped, params[name])
    if "v3" in names and config.v3_mode == "downsample":
        # The paper's V3 is V2 itself downsampled: same crop, boxes scaled by v3/v2, mirrored when
        # V3's own flip differs from V2's.
        v2_image, v2_boxes = geometric["v2"]
        size = [config.v3_size, config.v3_size]
        v3_image = F.resize(v2_image, size, antialias=True)
        v3_boxes = F.clamp_bounding_boxes(F.resize(v2_boxes, size))
        if params["v3"].flip != params["v2"].flip:
            v3_image, v3_boxes = F.horizontal_flip(v3_image), F.horizontal_flip(v3_boxes)
        geometric["v3"] = (v3_image, v3_boxes)

    views, view_boxes = [], []
    for name in names:
        view_image, boxes_in_view = geometric[name]
        pixels = F.to_dtype(view_image.as_subclass(torch.Tensor), torch.float32, scale=True)
        if use_color:
            first = name == "v1"
            color = _color_params(
                generator,
                _BLUR_PROB_V1 if first else _BLUR_PROB_OTHERS,
                0.0 if first else _SOLARIZE_PROB_OTHERS,
            )
            pixels = _apply_color(pixels, color)
        views.append(F.normalize(pixels, list(IMAGENET_MEAN), list(IMAGENET_STD)))
        if config.box_source == "whole_image":
            side = float(params[name].size)
            view_boxes.append(torch.tensor([[0.0, 0.0, side, side]]))
        else:
            view_boxes.append(boxes_in_view.as_subclass(torch.Tensor).to(torch.float32))
    return {
        "views": views,
        "boxes": view_boxes,
        "view_names": names,
        "params": [params[name] for name in names],
        "proposal_ids": proposal_ids,
    }
