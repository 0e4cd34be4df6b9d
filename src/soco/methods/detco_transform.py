"""DetCo's sample transform: two global views and, for each, a 3x3 jigsaw set of local patches (Xie et al., ICCV 2021).

The authors never released the pretraining code; what is built here follows the paper's figure and
text as far as they go, and every guess is named (docs/methods.md). Global views: MoCo v2's augmentation
(random resized crop 0.2-1 to `global_size`, colour jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale 0.2,
Gaussian blur p 0.5, flip). Local patch set (PIRL's jigsaw): a random crop covering at least 60% of the
image resized to `local_size`, cut into a 3x3 grid of cells, a random `patch_size` crop from each cell,
colour augmentation per patch; `shuffle_patches` permutes the nine (open in the paper: off by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from soco.config.validation import FRACTION, POSITIVE, at_least, config_rules, interval
from soco.data.views import as_image, bernoulli, random_resized_crop
from soco.errors import ConfigError
from soco.methods.moco_transform import MoCoTransform, MoCoViewsConfig

GRID = 3  # 3x3 cells


@config_rules(
    global_size=at_least(1), global_scale=interval(FRACTION), local_size=at_least(GRID), local_scale=interval(FRACTION),
    patch_size=at_least(1), crop_ratio=interval(POSITIVE),
)
@dataclass
class DetCoViewsConfig(MoCoViewsConfig):
    """DetCo's global views and local patch sets (the paper's sizes); flip, blur and colour as MoCoViewsConfig."""

    global_size: int = 224
    global_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    local_size: int = 255  # the local crop's side before the grid: cells of local_size // 3
    local_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    patch_size: int = 64  # a random crop of this side from each cell
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    shuffle_patches: bool = False  # permute the nine patches of a set (the paper does not say)

    def check_values(self) -> None:
        """A patch must fit in its grid cell (each key's own range is in the rules above)."""
        if self.patch_size > self.local_size // GRID:
            raise ConfigError(f"method.views.patch_size must be in [1, local_size // 3 = {self.local_size // GRID}], "
                              f"not {self.patch_size}")


class DetCoTransform(MoCoTransform):
    """Query and key global views and local patch sets of one image."""

    def global_view(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random resized crop to global_size, flipped at random, coloured."""
        config = self.config
        top, left, height, width = random_resized_crop(image.shape[-2], image.shape[-1], config.global_scale,
                                                       config.crop_ratio, generator)
        view = F.resized_crop(image, top, left, height, width, [config.global_size] * 2, antialias=True)
        if bernoulli(generator, config.flip_prob):
            view = F.horizontal_flip(view)
        return self.colour(F.to_dtype(view, torch.float32, scale=True), generator)

    def patch_set(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(9, 3, P, P) patches in grid order (row-major), each coloured on its own; and their corners in the
        local crop, (top, left) each, before any shuffle."""
        config = self.config
        top, left, height, width = random_resized_crop(image.shape[-2], image.shape[-1], config.local_scale,
                                                       config.crop_ratio, generator)
        local = F.resized_crop(image, top, left, height, width, [config.local_size] * 2, antialias=True)
        cell = config.local_size // GRID
        patches, corners = [], []
        for row in range(GRID):
            for column in range(GRID):
                y = row * cell + int(torch.randint(0, cell - config.patch_size + 1, (1,), generator=generator)[0])
                x = column * cell + int(torch.randint(0, cell - config.patch_size + 1, (1,), generator=generator)[0])
                patch = local[:, y:y + config.patch_size, x:x + config.patch_size]
                patches.append(self.colour(F.to_dtype(patch, torch.float32, scale=True), generator))
                corners.append((y, x))
        stacked = torch.stack(patches)
        if config.shuffle_patches:
            order = torch.randperm(GRID * GRID, generator=generator)
            stacked, corners = stacked[order], [corners[i] for i in order.tolist()]
        return stacked, corners

    def __call__(self, image: np.ndarray, proposals: np.ndarray, generator: torch.Generator, source=None) -> dict:
        """{"global_q", "global_k": 3xGxG; "local_q", "local_k": 9x3xPxP}."""
        picture = as_image(image).as_subclass(torch.Tensor)
        return {
            "global_q": self.global_view(picture, generator),
            "global_k": self.global_view(picture, generator),
            "local_q": self.patch_set(picture, generator)[0],
            "local_k": self.patch_set(picture, generator)[0],
        }
