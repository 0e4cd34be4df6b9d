"""InsLoc's sample transform: a crop of the image pasted onto two other images (Yang et al., CVPR 2021).

The data-set item is the foreground. Two backgrounds are drawn from the whole data set (with
replacement, so the foreground itself may come up) and resized to canvas x canvas, aspect not kept.
Two foreground crops (area 0.2-1, aspect 1/2-2) are rescaled with their aspect kept to fit a random
w x h (each in `paste_size`: the long side fits the larger, the short side the smaller), then pasted
at a uniform position whose right and bottom edges stop a pixel short of the canvas's (before the
flip), as released: crop 1 on background 1 is the query composite, crop 2 on background 2 the key.
Every resize is bilinear without antialiasing, OpenCV's in the release. The paste rectangle is the
box. Each composite gets MoCo v2's colour jitter (0.4, 0.4, 0.4, 0.1), grayscale, a Gaussian blur
(p 0.5) and a flip that carries its box. For the query, a second box for P5 is drawn by the release's
bounding-box augmentation: fixed anchors on the stride-16 grid (sizes 32-256 at a 256 canvas, five
aspect ratios), those with IoU > 0.5 with the true box (else the 4000 closest) thinned by NMS at 0.7
on random scores, one survivor picked at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_iou, nms
from torchvision.transforms.v2 import functional as F

from soco.config.validation import FRACTION, POSITIVE, at_least, config_rules, each, interval
from soco.data.views import as_image, bernoulli, random_resized_crop
from soco.errors import ConfigError
from soco.methods.moco_transform import MoCoTransform, MoCoViewsConfig

ANCHOR_RATIOS = (0.5, 0.75, 1.0, 1.5, 2.0)  # height / width
ANCHOR_STRIDE = 16  # the P4 grid
ANCHOR_NMS_IOU = 0.7
ANCHOR_MIN_IOU = 0.5
ANCHOR_FALLBACK = 4000


@config_rules(
    canvas_size=at_least(1), crop_scale=interval(FRACTION), crop_ratio=interval(POSITIVE),
    paste_size=interval(at_least(1)), anchor_sizes=each(POSITIVE, min_length=1),
)
@dataclass
class InsLocViewsConfig(MoCoViewsConfig):
    """InsLoc's composites (the release's values at a 256 canvas); flip, blur and colour as MoCoViewsConfig."""

    canvas_size: int = 256  # backgrounds resized to this square; the network sees it as is
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.5, 2.0])
    paste_size: list[int] = field(default_factory=lambda: [128, 254])  # w and h drawn in this range (inclusive)
    box_augment: bool = True  # the query's P5 box from the anchor augmentation; off: the true box
    anchor_sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0])

    def check_values(self) -> None:
        """A pasted crop must fit on the canvas (each key's own range is in the rules above)."""
        if not self.paste_size[1] <= self.canvas_size:
            raise ConfigError(f"method.views.paste_size must be [low, high] with 1 <= low <= high <= canvas_size "
                              f"({self.canvas_size}), not {self.paste_size}")


def grid_anchors(canvas_size: int, sizes: list[float], stride: int = ANCHOR_STRIDE) -> torch.Tensor:
    """(positions x sizes x ratios, 4) anchors centred on the stride grid (centres at multiples of stride)."""
    centres = torch.arange(0, canvas_size, stride, dtype=torch.float64)
    shapes = []
    for size in sizes:
        for ratio in ANCHOR_RATIOS:  # same area size^2, height/width = ratio
            width = size / math.sqrt(ratio)
            shapes.append((width, width * ratio))
    shapes = torch.tensor(shapes, dtype=torch.float64)
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    centre = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)[:, None, :]
    half = shapes[None] / 2
    return torch.cat([centre - half, centre + half], dim=2).reshape(-1, 4)


def augment_box(box: torch.Tensor, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The release's bounding-box augmentation: a random NMS survivor among the anchors that overlap `box`."""
    ious = box_iou(box[None].double(), anchors)[0]
    candidates = torch.nonzero(ious > ANCHOR_MIN_IOU).flatten()
    if len(candidates) == 0:
        candidates = torch.argsort(ious, descending=True)[:ANCHOR_FALLBACK]
    scores = torch.rand(len(candidates), generator=generator, dtype=torch.float64)
    kept = candidates[nms(anchors[candidates], scores, ANCHOR_NMS_IOU)]
    chosen = kept[int(torch.randint(0, len(kept), (1,), generator=generator)[0])]
    return anchors[chosen].float()


def fitted_size(crop_w: int, crop_h: int, target_w: int, target_h: int) -> tuple[int, int]:
    """The crop's size rescaled, aspect kept, so that its long side fits max(target) and short side min(target)."""
    long_side, short_side = max(crop_w, crop_h), min(crop_w, crop_h)
    scale = min(max(target_w, target_h) / long_side, min(target_w, target_h) / short_side)
    return max(1, int(round(crop_w * scale))), max(1, int(round(crop_h * scale)))


class InsLocTransform(MoCoTransform):
    """The query and key composites of one foreground image, with their boxes."""

    def __init__(self, config: InsLocViewsConfig):
        super().__init__(config)
        self.anchors = grid_anchors(config.canvas_size, config.anchor_sizes)

    def background(self, source, generator: torch.Generator) -> torch.Tensor:
        """A random image of the data set, resized to the canvas (aspect not kept), uint8 3xSxS."""
        image, _, _ = source.draw(generator)
        size = [self.config.canvas_size] * 2
        # bilinear without antialiasing: the release's mmcv.imresize, OpenCV's INTER_LINEAR (copy_and_paste.py:109)
        return F.resize(as_image(image), size, antialias=False).as_subclass(torch.Tensor)

    def composite(self, foreground: torch.Tensor, background: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 composite, its (4,) box): a crop of the foreground pasted onto the background."""
        config = self.config
        height, width = foreground.shape[-2:]
        top, left, crop_h, crop_w = random_resized_crop(height, width, config.crop_scale, config.crop_ratio, generator)
        low, high = config.paste_size
        target_w = int(torch.randint(low, high + 1, (1,), generator=generator)[0])
        target_h = int(torch.randint(low, high + 1, (1,), generator=generator)[0])
        paste_w, paste_h = fitted_size(crop_w, crop_h, target_w, target_h)
        # bilinear without antialiasing, as the release's mmcv.imrescale (copy_and_paste.py:184)
        patch = F.resized_crop(foreground, top, left, crop_h, crop_w, [paste_h, paste_w], antialias=False)
        # the release draws the corner with np.random.randint(0, canvas - side), upper end excluded
        # (copy_and_paste.py:75-76): the paste never touches the far edges; a paste as wide as the canvas sits at 0
        x = int(torch.randint(0, max(1, config.canvas_size - paste_w), (1,), generator=generator)[0])
        y = int(torch.randint(0, max(1, config.canvas_size - paste_h), (1,), generator=generator)[0])
        composite = background.clone()
        composite[:, y:y + paste_h, x:x + paste_w] = patch
        return composite, torch.tensor([x, y, x + paste_w, y + paste_h], dtype=torch.float32)

    def appearance(self, composite: torch.Tensor, box: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour, blur and flip of a whole composite (the box flips with it); normalised float view."""
        view = self.colour(F.to_dtype(composite, torch.float32, scale=True), generator)
        if bernoulli(generator, self.config.flip_prob):
            view = F.horizontal_flip(view)  # after normalising: per-pixel values are the same either way
            size = self.config.canvas_size
            box = torch.stack([size - box[2], box[1], size - box[0], box[3]])
        return view, box

    def __call__(self, image: np.ndarray, proposals: np.ndarray, generator: torch.Generator, source) -> dict:
        """{"query", "key": 3xSxS; "query_box", "key_box", "query_box_p5": (4,)}."""
        foreground = as_image(image).as_subclass(torch.Tensor)
        backgrounds = [self.background(source, generator) for _ in range(2)]
        query, query_box = self.appearance(*self.composite(foreground, backgrounds[0], generator), generator)
        key, key_box = self.appearance(*self.composite(foreground, backgrounds[1], generator), generator)
        p5_box = augment_box(query_box, self.anchors, generator) if self.config.box_augment else query_box
        return {"query": query, "key": key, "query_box": query_box, "key_box": key_box, "query_box_p5": p5_box}
