"""SCRL's sample transform: two random crops, and box pairs drawn in their common region (Roh et al., CVPR 2021).

Each view is a random resized crop (area 0.2-1, aspect 3/4-4/3, bicubic) with its own flip and BYOL's
asymmetric colour pipeline; the release's "blur" is a bicubic down-and-up resize by 1.1, 1.2 or 1.5
(`blur=resize`, the default), the Gaussian is offered (`blur=gaussian`). The boxes come from geometry,
not proposals: the intersection of the two crops in original pixels, measured in "working" units where
the region looks smaller of the two views (per axis, the smaller of the views' scale factors); when it
is empty or not larger than `min_box_size` on a side, the image gets no box. Otherwise boxes_per_image boxes are
drawn in working units (grid mode: a random grid of cells at least `min_box_size` wide, a random cell,
a size uniform in [min_box_size, cell], a position uniform in the cell; plain mode: size and position
uniform), each redrawn up to `overlap_retries` times until its IoU with every earlier box is below
`max_overlap` (after the last retry the draw is kept, as in the release), then mapped into each view
through crop, resize and flip. Row i of both views' boxes is the same region of the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_iou
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from soco.config.validation import FRACTION, POSITIVE, PROBABILITY, Range, at_least, config_rules, interval, one_of
from soco.data.views import ViewParams, apply_color, as_image, draw_color_params, draw_cropped_views, normalize
from soco.data.views import random_resized_crop, uniform
from soco.errors import ConfigError

BLUR_MODES = ("resize", "gaussian")
BOX_SAMPLING = ("grid", "plain")
RESIZE_BLUR_FACTORS = (1.1, 1.2, 1.5)
BLUR_PROB = (1.0, 0.1)  # view 1, view 2
SOLARIZE_PROB = (0.0, 0.2)
SOLARIZE_THRESHOLD = 0.5  # 128 of 255


@config_rules(
    size=at_least(1), crop_scale=interval(FRACTION), crop_ratio=interval(POSITIVE), flip_prob=PROBABILITY,
    blur=one_of(*BLUR_MODES), boxes_per_image=at_least(1), min_box_size=POSITIVE, box_sampling=one_of(*BOX_SAMPLING),
    max_overlap=PROBABILITY, overlap_retries=at_least(0), jitter_range=Range(0.0, 1.0, high_open=True),
)
@dataclass
class SCRLViewsConfig:
    """SCRL's two views and the box pairs drawn in their common region (the release's values)."""

    size: int = 224
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    flip_prob: float = 0.5
    color_augment: bool = True
    blur: str = "resize"  # "resize" (the release's bicubic down-and-up) or "gaussian" (BYOL's)
    boxes_per_image: int = 10  # SCRL's K
    min_box_size: float = 32.0  # in working units (the views' pixels where the region looks smaller)
    box_sampling: str = "grid"  # "grid" (the release's multi-scale cells) or "plain"
    max_overlap: float = 0.5  # a box is redrawn while its IoU with an earlier box of the image reaches this
    overlap_retries: int = 49  # re-draws after the first: 50 draws in all, as models/box_generator.py 76 tries
    box_jitter: bool = False  # the release's option (off in both its configs): moves the view-2 box only
    jitter_range: float = 0.1  # u ~ U(1 - r, 1 + r)

    def check_values(self) -> None:
        """A box must fit in a view (each key's own range is in the rules above)."""
        if not self.min_box_size < self.size:
            raise ConfigError(f"method.views.min_box_size must be in (0, size), not {self.min_box_size}")


def common_region(first: ViewParams, second: ViewParams) -> tuple[float, float, float, float] | None:
    """The intersection of two crops as x1 y1 x2 y2 in original pixels, or None when empty."""
    x1, y1 = max(first.left, second.left), max(first.top, second.top)
    x2 = min(first.left + first.width, second.left + second.width)
    y2 = min(first.top + first.height, second.top + second.height)
    if x2 <= x1 or y2 <= y1:
        return None
    return float(x1), float(y1), float(x2), float(y2)


def working_scale(first: ViewParams, second: ViewParams) -> tuple[float, float]:
    """Per axis, the smaller of the two views' scale factors: the view where the region looks smaller."""
    (ax, ay), (bx, by) = first.scale(), second.scale()
    return min(ax, bx), min(ay, by)


def sample_box(width: float, height: float, config: SCRLViewsConfig, generator: torch.Generator) -> torch.Tensor:
    """One box (x1, y1, x2, y2) inside a width x height region in working units, float64."""
    low = config.min_box_size
    if config.box_sampling == "grid":
        columns = int(torch.randint(1, max(1, int(width // low)) + 1, (1,), generator=generator)[0])
        rows = int(torch.randint(1, max(1, int(height // low)) + 1, (1,), generator=generator)[0])
        cell_w, cell_h = width / columns, height / rows
        column = int(torch.randint(0, columns, (1,), generator=generator)[0])
        row = int(torch.randint(0, rows, (1,), generator=generator)[0])
        box_w = uniform(generator, low, max(low, cell_w))
        box_h = uniform(generator, low, max(low, cell_h))
        x1 = column * cell_w + uniform(generator, 0.0, max(0.0, cell_w - box_w))
        y1 = row * cell_h + uniform(generator, 0.0, max(0.0, cell_h - box_h))
    else:
        box_w = uniform(generator, low, width)
        box_h = uniform(generator, low, height)
        x1 = uniform(generator, 0.0, width - box_w)
        y1 = uniform(generator, 0.0, height - box_h)
    return torch.tensor([x1, y1, x1 + box_w, y1 + box_h], dtype=torch.float64)


def sample_boxes(width: float, height: float, config: SCRLViewsConfig, generator: torch.Generator) -> torch.Tensor:
    """boxes_per_image boxes in working units; each after the first redrawn while its IoU with an earlier one is too high."""
    boxes: list[torch.Tensor] = []
    for number in range(config.boxes_per_image):
        box = sample_box(width, height, config, generator)
        for _ in range(config.overlap_retries if number else 0):
            if float(box_iou(box[None], torch.stack(boxes)).max()) < config.max_overlap:
                break
            box = sample_box(width, height, config, generator)
        boxes.append(box)  # after the last retry the draw is kept, as in the release
    return torch.stack(boxes)


def jitter_second_view(boxes: torch.Tensor, jitter_range: float, generator: torch.Generator) -> torch.Tensor:
    """The release's box jitter of the view-2 boxes: x1 += w(u0-1), y1 += h(u1-1), w *= u2, h *= u3."""
    factors = 1.0 + (torch.rand((len(boxes), 4), generator=generator, dtype=torch.float64) * 2 - 1) * jitter_range
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    x1 = boxes[:, 0] + widths * (factors[:, 0] - 1)
    y1 = boxes[:, 1] + heights * (factors[:, 1] - 1)
    return torch.stack([x1, y1, x1 + widths * factors[:, 2], y1 + heights * factors[:, 3]], dim=1)


def box_pairs(first: ViewParams, second: ViewParams, config: SCRLViewsConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, 4), (N, 4)) boxes of the same regions in view 1 and view 2, N = boxes_per_image or 0, clipped to the views."""
    empty = torch.zeros((0, 4), dtype=torch.float32)
    region = common_region(first, second)
    if region is None:
        return empty, empty
    scale_x, scale_y = working_scale(first, second)
    width, height = (region[2] - region[0]) * scale_x, (region[3] - region[1]) * scale_y
    if width <= config.min_box_size or height <= config.min_box_size:
        return empty, empty
    working = sample_boxes(width, height, config, generator)
    origin = torch.tensor([region[0], region[1], region[0], region[1]], dtype=torch.float64)
    in_pixels = origin + working / torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float64)
    view1, view2 = first.to_view(in_pixels), second.to_view(in_pixels)
    if config.box_jitter:
        view2 = jitter_second_view(view2, config.jitter_range, generator)
    return view1.clamp(0, first.size).float(), view2.clamp(0, second.size).float()


def resize_blur(image: torch.Tensor, factor: float) -> torch.Tensor:
    """The release's "blur": a bicubic downscale by `factor` and back up to the same size."""
    height, width = image.shape[-2:]
    small = [max(1, int(height / factor)), max(1, int(width / factor))]
    down = F.resize(image, small, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.resize(down, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)


class SCRLTransform:
    """Two views of an image and the box pairs of their common region; proposals are not used."""

    needs_proposals = False

    def __init__(self, config: SCRLViewsConfig):
        self.config = config

    def crops(self, height: int, width: int, generator: torch.Generator) -> tuple[ViewParams, ViewParams]:
        """Both views' crops and flips, drawn in that order."""
        config = self.config
        crop = lambda h, w, g: random_resized_crop(h, w, config.crop_scale, config.crop_ratio, g)  # noqa: E731
        first, second = draw_cropped_views(("v1", "v2"), height, width, crop, config.flip_prob, config.size, generator)
        return first, second

    def view(self, image: torch.Tensor, crop: ViewParams, number: int, generator: torch.Generator) -> torch.Tensor:
        """One normalised view: crop, bicubic resize, flip, then the colour pipeline of view `number`."""
        pixels = F.resized_crop(image, crop.top, crop.left, crop.height, crop.width, [crop.size, crop.size],
                                interpolation=InterpolationMode.BICUBIC, antialias=True)
        if crop.flip:
            pixels = F.horizontal_flip(pixels)
        pixels = F.to_dtype(pixels.as_subclass(torch.Tensor), torch.float32, scale=True)
        if self.config.color_augment:
            params = draw_color_params(generator, BLUR_PROB[number], SOLARIZE_PROB[number])
            factor = RESIZE_BLUR_FACTORS[int(torch.randint(0, len(RESIZE_BLUR_FACTORS), (1,), generator=generator)[0])]
            if self.config.blur == "resize":
                # the same order as the Gaussian pipeline: jitter, grayscale, blur, solarize
                pixels = apply_color(pixels, {**params, "blur": False, "solarize": False})
                if params["blur"]:
                    pixels = resize_blur(pixels, factor)
                if params["solarize"]:
                    pixels = F.solarize(pixels, SOLARIZE_THRESHOLD)
            else:
                pixels = apply_color(pixels, params)
        return normalize(pixels)

    def __call__(self, image: np.ndarray, proposals: np.ndarray, generator: torch.Generator, source=None) -> dict:
        """{"views": {"v1", "v2"}: 3xSxS, "boxes": {"v1", "v2"}: (N, 4)} with N = boxes_per_image or 0."""
        picture = as_image(image)
        height, width = picture.shape[-2:]
        first, second = self.crops(height, width, generator)
        boxes1, boxes2 = box_pairs(first, second, self.config, generator)
        return {
            "views": {"v1": self.view(picture, first, 0, generator), "v2": self.view(picture, second, 1, generator)},
            "boxes": {"v1": boxes1, "v2": boxes2},
        }

    def collate(self, samples: list[dict]) -> dict:
        """Views stacked (B, 3, S, S); boxes of every image concatenated (N, 4) with their image index (N,)."""
        counts = [len(sample["boxes"]["v1"]) for sample in samples]
        return {
            "views": {name: torch.stack([s["views"][name] for s in samples]) for name in ("v1", "v2")},
            "boxes": {name: torch.cat([s["boxes"][name] for s in samples]) for name in ("v1", "v2")},
            "box_image": torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts, dtype=torch.long)),
            "boxes_per_image": torch.tensor(counts, dtype=torch.long),
        }
