"""What the MoCo-style transforms share: MoCo v2's colour pipeline, its keys, and a batch of stacked samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soco.config.validation import PROBABILITY, config_rules
from soco.data.collate import stack_samples
from soco.data.views import MOCO_V2_JITTER, apply_color, draw_color_params, normalize


@config_rules(flip_prob=PROBABILITY, blur_prob=PROBABILITY)
@dataclass
class MoCoViewsConfig:
    """The views keys InsLoc and DetCo share: flip, MoCo v2's colour pipeline (without solarize) and its blur."""

    flip_prob: float = 0.5
    blur_prob: float = 0.5
    color_augment: bool = True


class MoCoTransform:
    """A transform that reads no proposals, colours like MoCo v2 and stacks its samples into a batch."""

    needs_proposals = False

    def __init__(self, config: MoCoViewsConfig):
        self.config = config

    def colour(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """MoCo v2's colour (jitter 0.4/0.4/0.4/0.1, grayscale, blur; no solarize) of a [0, 1] image, normalised."""
        if self.config.color_augment:
            params = draw_color_params(generator, self.config.blur_prob, 0.0, strength=MOCO_V2_JITTER)
            pixels = apply_color(pixels, params)
        return normalize(pixels)

    def collate(self, samples: list[dict]) -> dict:
        """Every entry of the samples stacked on a new batch dimension."""
        return stack_samples(samples)
