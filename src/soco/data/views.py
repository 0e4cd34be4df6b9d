"""View primitives shared by every method: seeded crops that carry boxes, flips, colour, box jitter and cut-out.

Every random number comes from a `torch.Generator` handed in, and every function draws a fixed amount
from it whatever the outcome, so the same generator state gives bitwise the same views and a method's
recipe (e.g. SoCo's V1-V4 in `soco.methods.soco_transform`) stays reproducible across data-loader
workers. Boxes are x1 y1 x2 y2 in pixels with x in [0, W]; images and boxes go through the same
torchvision v2 kernels, so a box follows its pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from soco.data.color import apply_color_hwc

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BLUR_KERNEL_RULES",
    "MOCO_V2_JITTER",
    "ViewParams",
    "uniform",
    "bernoulli",
    "random_resized_crop",
    "clamped_resized_crop",
    "crop_region",
    "overlaps",
    "intersection",
    "is_empty",
    "jitter_boxes",
    "random_boxes",
    "random_image_boxes",
    "as_image",
    "crop_resize_flip",
    "draw_color_params",
    "blur_kernel_size",
    "apply_color",
    "COLOR_BACKENDS",
    "cut_out_boxes",
    "normalize",
    "denormalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The BYOL colour pipeline: ColorJitter(brightness, contrast, saturation, hue) and probabilities.
_JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)
MOCO_V2_JITTER = (0.4, 0.4, 0.4, 0.1)  # MoCo v2's (InsLoc, DetCo): saturation as strong as brightness
_JITTER_PROB = 0.8
_GRAYSCALE_PROB = 0.2
_BLUR_SIGMA = (0.1, 2.0)
_SOLARIZE_THRESHOLD = 0.5
# Who computes the colour pipeline: OpenCV (fast) or torchvision's tensor kernels (the reference; the
# golden-weights test pins it, as its digests were recorded with it).
COLOR_BACKENDS = ("opencv", "torchvision")
COLOR_BACKEND = "opencv"
# "sigma": an odd kernel that covers +-3 sigma (2*ceil(3 sigma)+1), whatever the view size;
# "tenth": SimCLR's and BYOL's 10% of the view side (23 at 224), which truncates a large sigma on small views.
BLUR_KERNEL_RULES = ("sigma", "tenth")

# Random boxes inside a region (`random_boxes`): side relative to the region's geometric mean side.
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

    def scale(self) -> tuple[float, float]:
        """View pixels per original pixel along x and y."""
        return self.size / self.width, self.size / self.height

    def to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4) x1 y1 x2 y2 boxes in original pixels -> this view's pixels (crop, resize, flip), unclipped."""
        scale_x, scale_y = self.scale()
        x1 = (boxes[:, 0] - self.left) * scale_x
        x2 = (boxes[:, 2] - self.left) * scale_x
        y1 = (boxes[:, 1] - self.top) * scale_y
        y2 = (boxes[:, 3] - self.top) * scale_y
        if self.flip:
            x1, x2 = self.size - x2, self.size - x1
        return torch.stack([x1, y1, x2, y2], dim=1)


def uniform(generator: torch.Generator, low: float, high: float, count: int | None = None) -> torch.Tensor | float:
    """Uniform draw(s) in [low, high) from `generator` (float64, so crop sizes match torchvision's math)."""
    shape = (1,) if count is None else (count,)
    values = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    return float(values[0]) if count is None else values


def bernoulli(generator: torch.Generator, probability: float) -> bool:
    """One coin with P(True) = probability; always draws, so the stream does not depend on p."""
    return bool(torch.rand(1, generator=generator, dtype=torch.float64)[0] < probability)


def random_resized_crop(
    height: int, width: int, scale: list[float], ratio: list[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it, but from `generator`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_SAMPLING_TRIES):
        target_area = area * uniform(generator, scale[0], scale[1])
        aspect = math.exp(uniform(generator, *log_ratio))
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


def clamped_resized_crop(
    height: int, width: int, scale: list[float], ratio: list[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn once and clamped to the image, as BYOL's release crops (its utils/dataset.py:206-233).

    Area fraction U(scale) and log aspect U(log ratio), w = round(sqrt(area * aspect)), h = round(sqrt(area /
    aspect)), each side clamped to the image's (no retries, no central fallback: a clamped crop keeps the side
    it could not fit, so its aspect may leave `ratio`), then the left and the top offsets uniform over the
    places the crop fits (the release draws the horizontal offset first). A side is at least one pixel (the
    release's would be 0 on an image of a few pixels, where decoding the crop fails).
    """
    area = height * width
    target_area = area * uniform(generator, scale[0], scale[1])
    aspect = math.exp(uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
    crop_w = max(1, min(int(round(math.sqrt(target_area * aspect))), width))
    crop_h = max(1, min(int(round(math.sqrt(target_area / aspect))), height))
    left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator)[0])
    top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator)[0])
    return top, left, crop_h, crop_w


def draw_cropped_views(names: Sequence[str], height: int, width: int, crop, flip_prob: float, size: int,
                       generator: torch.Generator) -> list[ViewParams]:
    """One ViewParams per name, each drawing its crop `crop(height, width, generator)` and then its flip."""
    drawn = []
    for name in names:
        top, left, crop_h, crop_w = crop(height, width, generator)
        drawn.append(ViewParams(name, top, left, crop_h, crop_w, bernoulli(generator, flip_prob), size))
    return drawn


def overlaps(boxes: torch.Tensor, region: tuple[float, float, float, float]) -> torch.Tensor:
    """(N,) bool: which x1 y1 x2 y2 boxes overlap `region` with positive area."""
    x1, y1, x2, y2 = (float(v) for v in region)
    inter_w = boxes[:, 2].clamp(max=x2) - boxes[:, 0].clamp(min=x1)
    inter_h = boxes[:, 3].clamp(max=y2) - boxes[:, 1].clamp(min=y1)
    return (inter_w > 0) & (inter_h > 0)


def intersection(regions: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """The common part of x1 y1 x2 y2 regions (may be empty: x2 <= x1 or y2 <= y1)."""
    return (
        max(r[0] for r in regions),
        max(r[1] for r in regions),
        min(r[2] for r in regions),
        min(r[3] for r in regions),
    )


def is_empty(region: tuple[int, int, int, int]) -> bool:
    """Whether an x1 y1 x2 y2 region has no area."""
    return region[2] <= region[0] or region[3] <= region[1]


def crop_region(crop: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) as x1 y1 x2 y2."""
    top, left, crop_h, crop_w = crop
    return (left, top, left + crop_w, top + crop_h)


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
    """`count` random boxes inside `region` (x1 y1 x2 y2).

    Centre uniform in the region; side s ~ U(0.1, 0.8) of the region's geometric mean side;
    aspect a = w/h log-uniform in [1/3, 3] (w = s*sqrt(a), h = s/sqrt(a)); clipped to the region.
    """
    x1, y1, x2, y2 = (float(v) for v in region)
    mean_side = math.sqrt((x2 - x1) * (y2 - y1))
    centre_x = uniform(generator, x1, x2, count)
    centre_y = uniform(generator, y1, y2, count)
    side = uniform(generator, *_RANDOM_BOX_SIDE, count) * mean_side
    aspect = torch.exp(uniform(generator, math.log(_RANDOM_BOX_ASPECT[0]), math.log(_RANDOM_BOX_ASPECT[1]), count))
    half_w = side * aspect.sqrt() / 2
    half_h = side / aspect.sqrt() / 2
    boxes = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(x1, x2)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(y1, y2)
    return boxes.to(torch.float32)


def random_image_boxes(
    count: int,
    width: int,
    height: int,
    generator: torch.Generator,
    min_side: float = 32.0,
    max_aspect: float = 3.0,
    relative_scale: tuple[float, float] = (0.3, 0.8),
) -> torch.Tensor:
    """`count` random boxes over a whole W x H image that obey the proposal filter's rules.

    Relative scale sqrt(wh)/sqrt(WH) ~ U(relative_scale), aspect w/h log-uniform in [1/max_aspect,
    max_aspect], both sides at least `min_side` (or the image side, if smaller), position uniform
    over the places where the box fits: the "random boxes" ablation (the paper's Table 5c).
    """
    scale = uniform(generator, *relative_scale, count) * math.sqrt(width * height)
    aspect = torch.exp(uniform(generator, -math.log(max_aspect), math.log(max_aspect), count))
    box_w = (scale * aspect.sqrt()).clamp(min=min(min_side, width), max=width)
    box_h = (scale / aspect.sqrt()).clamp(min=min(min_side, height), max=height)
    left = uniform(generator, 0.0, 1.0, count) * (width - box_w)
    top = uniform(generator, 0.0, 1.0, count) * (height - box_h)
    return torch.stack([left, top, left + box_w, top + box_h], dim=1).to(torch.float32)


def as_image(image: torch.Tensor | np.ndarray) -> tv_tensors.Image:
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


def crop_resize_flip(
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


def draw_color_params(generator: torch.Generator, blur_prob: float, solarize_prob: float,
                      strength: tuple[float, float, float, float] = _JITTER_STRENGTH) -> dict:
    """Draw one view's colour augmentation (every draw always happens, so the stream length is fixed).

    `strength` is ColorJitter's (brightness, contrast, saturation, hue): BYOL's (0.4, 0.4, 0.2, 0.1) by
    default, MOCO_V2_JITTER for the MoCo family.
    """
    brightness, contrast, saturation, hue = strength
    return {
        "jitter": bernoulli(generator, _JITTER_PROB),
        "order": torch.randperm(4, generator=generator).tolist(),
        "brightness": uniform(generator, 1 - brightness, 1 + brightness),
        "contrast": uniform(generator, 1 - contrast, 1 + contrast),
        "saturation": uniform(generator, 1 - saturation, 1 + saturation),
        "hue": uniform(generator, -hue, hue),
        "grayscale": bernoulli(generator, _GRAYSCALE_PROB),
        "blur": bernoulli(generator, blur_prob),
        "sigma": uniform(generator, *_BLUR_SIGMA),
        "solarize": bernoulli(generator, solarize_prob),
    }


def blur_kernel_size(sigma: float, side: int, rule: str = "sigma") -> int:
    """Odd Gaussian kernel side: covering +-3 sigma ("sigma"), or 10% of the view side ("tenth"); at least 3."""
    if rule == "sigma":
        kernel = 2 * math.ceil(3.0 * sigma) + 1
    elif rule == "tenth":
        kernel = max(3, int(0.1 * side))
    else:
        raise ValueError(f"blur kernel rule must be one of {BLUR_KERNEL_RULES}, not {rule!r}")
    kernel = max(3, kernel)
    return kernel if kernel % 2 else kernel + 1


def apply_color(image: torch.Tensor, params: dict, blur_kernel: str = "sigma", backend: str | None = None) -> torch.Tensor:
    """The BYOL colour pipeline on a float [0, 1] 3xHxW image, with parameters drawn beforehand.

    `backend` "opencv" (the default, COLOR_BACKEND) computes it in `soco.data.color`, several times
    faster; "torchvision" with torchvision's tensor kernels, the reference that equals it to rounding.
    """
    backend = backend or COLOR_BACKEND
    if backend == "opencv":
        kernel = blur_kernel_size(params["sigma"], image.shape[-1], blur_kernel) if params["blur"] else None
        pixels = apply_color_hwc(image.permute(1, 2, 0).numpy(), params, kernel)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    if backend != "torchvision":
        raise ValueError(f"colour backend must be one of {COLOR_BACKENDS}, not {backend!r}")
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
        kernel = blur_kernel_size(params["sigma"], image.shape[-1], blur_kernel)
        image = F.gaussian_blur(image, [kernel, kernel], [params["sigma"], params["sigma"]])
    if params["solarize"]:
        image = F.solarize(image, _SOLARIZE_THRESHOLD)
    return image


def cut_out_boxes(
    image: torch.Tensor,
    boxes: torch.Tensor,
    generator: torch.Generator,
    probability: float = 0.5,
    area: tuple[float, float] = (0.1, 0.3),
    fill: float = 0.0,
) -> torch.Tensor:
    """Erase, with `probability` per box, a rectangle of U(area) of the box's area inside the box.

    The rectangle has the box's aspect ratio and a uniform position inside it; on a normalised view,
    fill 0 is the data set mean. This is the release's box cut-out on V2 and V3, which the paper does
    not mention. Every box draws the same numbers whatever the outcome.
    """
    image = image.clone()
    height, width = image.shape[-2:]
    for x1, y1, x2, y2 in boxes.tolist():
        chosen = bernoulli(generator, probability)
        fraction = uniform(generator, *area)
        where_x, where_y = uniform(generator, 0.0, 1.0), uniform(generator, 0.0, 1.0)
        box_w, box_h = x2 - x1, y2 - y1
        if not chosen or box_w <= 0 or box_h <= 0:
            continue
        cut_w, cut_h = box_w * math.sqrt(fraction), box_h * math.sqrt(fraction)
        left = x1 + where_x * (box_w - cut_w)
        top = y1 + where_y * (box_h - cut_h)
        col0, col1 = max(0, int(round(left))), min(width, int(round(left + cut_w)))
        row0, row1 = max(0, int(round(top))), min(height, int(round(top + cut_h)))
        image[..., row0:row1, col0:col1] = fill
    return image


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a float [0, 1] RGB view."""
    return F.normalize(pixels, list(IMAGENET_MEAN), list(IMAGENET_STD))


def denormalize(view: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of a (..., 3, H, W) view: float RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=view.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=view.dtype).view(3, 1, 1)
    return (view * std + mean).clamp(0, 1)
