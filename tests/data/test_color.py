"""The OpenCV colour pipeline equals torchvision's, operation by operation, to float32 rounding."""

import pytest
import torch

from soco.data.color import gaussian_kernel
from soco.data.views import MOCO_V2_JITTER, apply_color, draw_color_params


def photo_like(seed: int, side: int = 48) -> torch.Tensor:
    """A 3xSxS float image with smooth colour gradients, flat grey patches and saturated corners."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2]) * 0.6 + 0.4 * torch.rand(3, side, side, generator=generator)
    image[:, :8, :8] = 0.5  # grey: hue undefined, saturation 0
    image[:, -8:, -8:] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # pure red
    image[:, :4, -4:] = 1.0  # white
    return image.clamp(0, 1)


ONE_OPERATION = {
    "brightness": {"order": [0], "brightness": 1.37},
    "contrast": {"order": [1], "contrast": 0.63},
    "saturation": {"order": [2], "saturation": 1.45},
    "hue": {"order": [3], "hue": -0.37},
    "hue_positive": {"order": [3], "hue": 0.08},
}


def params_with(**changes):
    """Colour parameters that do nothing, with `changes` applied."""
    base = {"jitter": False, "order": [0, 1, 2, 3], "brightness": 1.0, "contrast": 1.0, "saturation": 1.0,
            "hue": 0.0, "grayscale": False, "blur": False, "sigma": 1.0, "solarize": False}
    return {**base, **changes}


@pytest.mark.parametrize("name", sorted(ONE_OPERATION))
def test_each_jitter_operation_equals_torchvision(name):
    image = photo_like(1)
    params = params_with(jitter=True, **ONE_OPERATION[name])
    fast = apply_color(image, params, backend="opencv")
    reference = apply_color(image, params, backend="torchvision")
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, rtol=0, atol=2e-6)
    assert not torch.equal(reference, image)  # the operation did something


@pytest.mark.parametrize("changes", [{"grayscale": True}, {"solarize": True}, {"blur": True, "sigma": 0.1},
                                     {"blur": True, "sigma": 1.3}, {"blur": True, "sigma": 2.0}])
def test_grey_blur_and_solarize_equal_torchvision(changes):
    image = photo_like(2)
    params = params_with(**changes)
    for rule in ("sigma", "tenth"):
        fast = apply_color(image, params, rule, backend="opencv")
        reference = apply_color(image, params, rule, backend="torchvision")
        torch.testing.assert_close(fast, reference, rtol=0, atol=2e-6)


def test_kernel_is_the_sampled_normalised_gaussian():
    kernel = gaussian_kernel(5, 1.0)
    weights = torch.exp(-0.5 * torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]) ** 2)
    torch.testing.assert_close(torch.from_numpy(kernel), weights / weights.sum())


@pytest.mark.parametrize("strength", [None, MOCO_V2_JITTER])
def test_whole_drawn_pipelines_equal_torchvision(strength):
    generator = torch.Generator().manual_seed(0)
    for seed in range(40):
        image = photo_like(seed, side=40 + seed % 3)
        extra = {} if strength is None else {"strength": strength}
        params = draw_color_params(generator, blur_prob=0.5, solarize_prob=0.3, **extra)
        fast = apply_color(image, params, "sigma", backend="opencv")
        reference = apply_color(image, params, "sigma", backend="torchvision")
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5, msg=f"seed {seed}: {params}")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="colour backend"):
        apply_color(photo_like(0), params_with(), backend="pillow")
