"""BYOL's sample transform as DeepMind released it: two random resized crops with asymmetric colour pipelines.

Every value is the release's (`google-deepmind/deepmind-research`, `byol/`): each view is its own random crop of
the image (utils/dataset.py:108-112, 206-233: area U(0.08, 1), aspect log-uniform in [3/4, 4/3], drawn once and
clamped to the image), resized to 224 x 224 bicubic without antialiasing and clipped to [0, 1] (dataset.py:197-202),
then flipped with probability 1/2 and put through the colour pipeline of its view (utils/augmentations.py:27-66,
69-104): colour jitter with probability 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random
order), grey with probability 0.2, a Gaussian blur (sigma U(0.1, 2), kernel a tenth of the side) with probability
1.0 on view 1 and 0.1 on view 2, solarize with probability 0 on view 1 and 0.2 on view 2. The views are normalised
with ImageNet's mean and deviation (dataset.py:63-69, applied in byol_experiment.py:167).

Switches where one may want what the other methods here do instead: `crop_sampling=torchvision` (RandomResizedCrop's
ten tries and central fallback), `antialias=true`, `color_ops=torchvision` (torchvision's colour definitions with a
reflect-padded blur, as SoCo's and SCRL's views). Not matched: TensorFlow's bicubic kernel (Keys, a = -0.5)
against torch's (a = -0.75), the release's float32 draws (float64 here) and its JAX random streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from soco.config.validation import FRACTION, POSITIVE, PROBABILITY, at_least, config_rules, each, interval, one_of
from soco.data.color import apply_byol_release_color_hwc, byol_release_blur_kernel_size
from soco.data.views import ViewParams, apply_color, as_image, clamped_resized_crop, draw_color_params
from soco.data.views import draw_cropped_views
from soco.data.views import normalize, random_resized_crop

VIEWS = ("v1", "v2")
CROP_SAMPLINGS = ("release", "torchvision")
COLOR_OPS = ("release", "torchvision")
# augmentations.py:33-36 and 55-59: ColorJitter's brightness, contrast, saturation, hue (both views)
RELEASE_JITTER = (0.4, 0.4, 0.2, 0.1)
# the release's jitter probability 0.8 (augmentations.py:38, 60), grey 0.2 (40, 61) and sigma U(0.1, 2.0) (48-49, 64)
# are soco.data.views' own (tests/methods/test_byol_transform.py holds them equal)


@config_rules(
    size=at_least(1), crop_scale=interval(FRACTION), crop_ratio=interval(POSITIVE),
    crop_sampling=one_of(*CROP_SAMPLINGS), flip_prob=PROBABILITY, color_ops=one_of(*COLOR_OPS),
    blur_prob=each(PROBABILITY, length=len(VIEWS)), solarize_prob=each(PROBABILITY, length=len(VIEWS)),
    blur_divider=POSITIVE,
)
@dataclass
class BYOLViewsConfig:
    """BYOL's two views (the release's values by default)."""

    size: int = 224  # dataset.py:201: both views resized to 224 x 224
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # dataset.py:210
    crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])  # dataset.py:212
    crop_sampling: str = "release"  # "release": one draw, clamped (dataset.py:216-220); "torchvision": ten tries
    antialias: bool = False  # dataset.py:201: tf.image.resize's default, no antialiasing when downscaling
    flip_prob: float = 0.5  # augmentations.py:29, 53, 352
    color_augment: bool = True  # off: geometry only (crop, resize, flip)
    color_ops: str = "release"  # "release": augmentations.py's definitions; "torchvision": soco.data.color's
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1])  # view 1, view 2: augmentations.py:44, 64
    solarize_prob: list[float] = field(default_factory=lambda: [0.0, 0.2])  # augmentations.py:50, 65
    blur_divider: float = 10.0  # kernel side ~ view side / 10: augmentations.py:46, 423


def view_crop(height: int, width: int, config: BYOLViewsConfig,
              generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one view's crop in original pixels."""
    draw = clamped_resized_crop if config.crop_sampling == "release" else random_resized_crop
    return draw(height, width, config.crop_scale, config.crop_ratio, generator)


class BYOLTransform:
    """Two independently cropped, flipped and coloured views of an image; proposals are not used."""

    needs_proposals = False

    def __init__(self, config: BYOLViewsConfig):
        self.config = config

    def crops(self, height: int, width: int, generator: torch.Generator) -> tuple[ViewParams, ViewParams]:
        """Both views' crops and flips, view 1's first (dataset.py:109-110, augmentations.py:101-103)."""
        config = self.config
        crop = lambda h, w, g: view_crop(h, w, config, g)  # noqa: E731
        first, second = draw_cropped_views(VIEWS, height, width, crop, config.flip_prob, config.size, generator)
        return first, second

    def geometric_view(self, image: torch.Tensor, crop: ViewParams) -> torch.Tensor:
        """Float [0, 1] 3xSxS: the crop resized bicubic from float pixels and clipped (dataset.py:197-202), flipped."""
        region = image[:, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
        pixels = region.as_subclass(torch.Tensor).to(torch.float32) / 255.0
        pixels = F.resize(pixels, [crop.size, crop.size], interpolation=InterpolationMode.BICUBIC,
                          antialias=self.config.antialias).clamp_(0.0, 1.0)
        return F.horizontal_flip(pixels) if crop.flip else pixels

    def color(self, pixels: torch.Tensor, number: int, generator: torch.Generator) -> torch.Tensor:
        """View `number`'s colour pipeline (0: view 1, 1: view 2) on float [0, 1] pixels."""
        config = self.config
        params = draw_color_params(generator, config.blur_prob[number], config.solarize_prob[number], RELEASE_JITTER)
        if config.color_ops == "torchvision":
            return apply_color(pixels, params, "tenth")
        kernel = byol_release_blur_kernel_size(pixels.shape[-2], config.blur_divider)
        hwc = apply_byol_release_color_hwc(pixels.permute(1, 2, 0).numpy(), params, kernel)
        return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()

    def __call__(self, image: np.ndarray, proposals: np.ndarray, generator: torch.Generator, source=None) -> dict:
        """{"views": {"v1", "v2"}: normalised 3xSxS float32}."""
        picture = as_image(image)
        height, width = picture.shape[-2:]
        crops = self.crops(height, width, generator)
        views = {}
        for number, crop in enumerate(crops):
            pixels = self.geometric_view(picture, crop)
            if self.config.color_augment:
                pixels = self.color(pixels, number, generator)
            views[crop.name] = normalize(pixels)
        return {"views": views}

    def collate(self, samples: list[dict]) -> dict:
        """Views stacked (B, 3, S, S) per view name."""
        return {"views": {name: torch.stack([sample["views"][name] for sample in samples]) for name in VIEWS}}
