"""BYOL's views as DeepMind released them: crops, bicubic resize, per-view colour pipelines, the release's colour."""

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as torch_f

from soco.config.loading import load_config
from soco.data import views as view_primitives
from soco.data.color import apply_byol_release_color_hwc, byol_release_blur_kernel_size, gaussian_kernel
from soco.data.views import IMAGENET_MEAN, IMAGENET_STD, ViewParams, clamped_resized_crop, denormalize
from soco.methods import byol_transform
from soco.methods.byol_transform import RELEASE_JITTER, BYOLTransform, BYOLViewsConfig


def views_config(*overrides) -> BYOLViewsConfig:
    return load_config("byol_tiny", list(overrides)).method.views


def photo(height=72, width=96, seed=0) -> np.ndarray:
    """A smooth synthetic RGB photo (uint8 HxWx3)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 120 * np.sin(x / (7 + 3 * c) + y / (11 + c) + phase[c]) for c in range(3)]
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)


NO_COLOUR = {"jitter": False, "order": [0, 1, 2, 3], "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0,
             "grayscale": False, "blur": False, "sigma": 1.0, "solarize": False}


def test_defaults_are_the_releases_values():
    views = BYOLViewsConfig()
    assert (views.size, views.crop_scale, views.crop_ratio, views.flip_prob) == (224, [0.08, 1.0], [0.75, 4 / 3], 0.5)
    assert (views.crop_sampling, views.antialias, views.color_ops) == ("release", False, "release")
    assert (views.blur_prob, views.solarize_prob, views.blur_divider) == ([1.0, 0.1], [0.0, 0.2], 10.0)
    # the jitter strengths and the probabilities and sigma range soco.data.views draws with (augmentations.py:27-66)
    assert RELEASE_JITTER == (0.4, 0.4, 0.2, 0.1)
    assert (view_primitives._JITTER_PROB, view_primitives._GRAYSCALE_PROB) == (0.8, 0.2)
    assert view_primitives._BLUR_SIGMA == (0.1, 2.0) and view_primitives._SOLARIZE_THRESHOLD == 0.5
    assert (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert BYOLTransform(views).needs_proposals is False


def test_the_release_s_crop_is_one_draw_clamped_to_the_image():
    # by hand, from the same generator: area fraction, log aspect, then the left and the top offsets
    generator, replay = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    top, left, crop_h, crop_w = clamped_resized_crop(150, 200, [0.08, 1.0], [0.75, 4 / 3], generator)
    fraction = float(torch.rand(1, generator=replay, dtype=torch.float64)) * 0.92 + 0.08
    log_aspect = float(torch.rand(1, generator=replay, dtype=torch.float64)) * (math.log(4 / 3) - math.log(0.75)) \
        + math.log(0.75)
    area = 150 * 200 * fraction
    assert crop_w == min(200, round(math.sqrt(area * math.exp(log_aspect))))
    assert crop_h == min(150, round(math.sqrt(area / math.exp(log_aspect))))
    assert left == int(torch.randint(0, 200 - crop_w + 1, (1,), generator=replay)[0])
    assert top == int(torch.randint(0, 150 - crop_h + 1, (1,), generator=replay)[0])
    # on a very wide image a tall draw is clamped to the height and keeps its width: no retry, no central crop
    g = torch.Generator().manual_seed(0)
    drawn = [clamped_resized_crop(20, 400, [0.5, 1.0], [0.75, 4 / 3], g) for _ in range(50)]
    assert all(h == 20 for _, _, h, _ in drawn) and max(w / h for _, _, h, w in drawn) > 4


def test_both_views_are_crops_of_scale_0_08_to_1_drawn_apart():
    transform = BYOLTransform(views_config())
    generator = torch.Generator().manual_seed(0)
    fractions, different = [], 0
    for _ in range(300):
        first, second = transform.crops(150, 200, generator)
        assert first.name == "v1" and second.name == "v2" and first.size == second.size == 64
        for crop in (first, second):
            fractions.append(crop.height * crop.width / (150 * 200))
            assert 0.75 * 0.97 <= crop.width / crop.height <= 4 / 3 * 1.03  # rounding to pixels
        different += (first.top, first.left, first.height, first.width) != (second.top, second.left, second.height,
                                                                               second.width)
    assert min(fractions) >= 0.08 - 0.005 and max(fractions) <= 1.0
    # the whole range is used: byol_image's V2 would never go below 0.5, and its V1 is always 1
    assert min(fractions) < 0.12 and max(fractions) > 0.95 and np.mean(np.array(fractions) < 0.5) > 0.4
    assert different == 300


def test_a_view_is_the_bicubic_resize_of_its_float_crop_clipped_without_antialiasing():
    image = torch.from_numpy(photo()).permute(2, 0, 1)
    crop = ViewParams("v1", 10, 20, 40, 50, False, 64)
    transform = BYOLTransform(views_config())
    got = transform.geometric_view(image, crop)
    region = image[:, 10:50, 20:70].float()[None] / 255
    bicubic = torch_f.interpolate(region, size=(64, 64), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    bilinear = torch_f.interpolate(region, size=(64, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(got, bicubic, rtol=0, atol=1e-6)
    assert (got - bilinear).abs().max() > 1e-3  # the test would see a bilinear resize
    flipped = transform.geometric_view(image, ViewParams("v1", 10, 20, 40, 50, True, 64))
    torch.testing.assert_close(flipped, got.flip(-1))
    # downscaling, antialias=false is not torchvision's antialiased resize
    small = ViewParams("v1", 0, 0, 72, 96, False, 16)
    antialiased = BYOLTransform(views_config("method.views.antialias=true")).geometric_view(image, small)
    assert (transform.geometric_view(image, small) - antialiased).abs().max() > 1e-2


def test_the_per_view_blur_and_solarize_probabilities(monkeypatch):
    calls = []
    original = byol_transform.draw_color_params

    def recording(generator, blur_prob, solarize_prob, strength):
        params = original(generator, blur_prob, solarize_prob, strength)
        calls.append((params, strength))
        return params

    monkeypatch.setattr(byol_transform, "draw_color_params", recording)
    transform = BYOLTransform(views_config())
    image = photo(40, 48)
    for seed in range(400):
        transform(image, np.zeros((0, 4)), torch.Generator().manual_seed(seed))
    drawn = {0: calls[0::2], 1: calls[1::2]}  # view 1's colour is drawn before view 2's
    keys = ("blur", "solarize", "jitter", "grayscale")
    share = {view: {key: np.mean([p[key] for p, _ in drawn[view]]) for key in keys} for view in (0, 1)}
    assert len(drawn[0]) == len(drawn[1]) == 400
    assert share[0]["blur"] == 1.0 and share[0]["solarize"] == 0.0  # view 1: always blurred, never solarised
    assert 0.06 < share[1]["blur"] < 0.14 and 0.15 < share[1]["solarize"] < 0.25  # view 2: 0.1 and 0.2
    for view in (0, 1):
        assert 0.75 < share[view]["jitter"] < 0.85 and 0.15 < share[view]["grayscale"] < 0.25
        assert all(strength == (0.4, 0.4, 0.2, 0.1) for _, strength in drawn[view])
        brightness = [p["brightness"] for p, _ in drawn[view]]
        assert 0.6 <= min(brightness) < 0.65 and 1.35 < max(brightness) <= 1.4
        assert max(abs(p["hue"]) for p, _ in drawn[view]) <= 0.1
        assert len({tuple(p["order"]) for p, _ in drawn[view]}) > 12  # a random order of the four ops


def test_the_release_s_blur_kernel_and_zero_padding():
    assert [byol_release_blur_kernel_size(side) for side in (224, 96, 64, 110, 19)] == [23, 9, 7, 11, 1]
    ones = np.ones((32, 32, 3), dtype=np.float32)
    params = {**NO_COLOUR, "blur": True, "sigma": 1.5}
    blurred = apply_byol_release_color_hwc(ones, params, 7)
    kernel = gaussian_kernel(7, 1.5).astype(np.float64)
    # by hand: 'SAME' zero padding, so a corner keeps only the kernel's inner parts of both passes
    corner = kernel[3:].sum() ** 2
    assert blurred[0, 0, 0] == pytest.approx(corner, abs=1e-6) and blurred[16, 16, 0] == pytest.approx(1.0, abs=1e-6)
    assert blurred[0, 16, 1] == pytest.approx(kernel[3:].sum(), abs=1e-6)
    # torchvision's pipeline pads by reflection: a constant image stays constant
    reflect = view_primitives.apply_color(torch.ones(3, 32, 32), params, "tenth")
    assert torch.allclose(reflect, torch.ones(3, 32, 32))


def test_the_release_s_colour_ops_by_hand():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.05, 0.95, (6, 5, 3)).astype(np.float32)

    def one(op, **values):
        return apply_byol_release_color_hwc(image, {**NO_COLOUR, "jitter": True, "order": [op], **values}, None)

    # brightness adds the delta factor - 1 (augmentations.py:239-240), clipped
    np.testing.assert_allclose(one(0, brightness=1.3), np.clip(image + 0.3, 0, 1), atol=1e-6)
    # contrast about each channel's own mean (243-247)
    mean = image.mean(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(one(1, contrast=1.4), np.clip(1.4 * (image - mean) + mean, 0, 1), atol=1e-5)
    # saturation and hue in HSV (250-258)
    for op, key, value in ((2, "saturation", 1.2), (2, "saturation", 0.8), (3, "hue", 0.07), (3, "hue", -0.09)):
        expected = np.empty_like(image)
        for index in np.ndindex(image.shape[:2]):
            h, s, v = colorsys.rgb_to_hsv(*image[index])
            s = min(1.0, s * value) if key == "saturation" else s
            h = (h + value) % 1.0 if key == "hue" else h
            expected[index] = colorsys.hsv_to_rgb(h, s, v)
        np.testing.assert_allclose(one(op, **{key: value}), np.clip(expected, 0, 1), atol=2e-5)
    # grey with 0.2989/0.587/0.114 (285-288), solarize above 0.5 (434-437)
    gray = apply_byol_release_color_hwc(image, {**NO_COLOUR, "grayscale": True}, None)
    np.testing.assert_allclose(gray[..., 0], image @ np.array([0.2989, 0.587, 0.114]), atol=1e-6)
    solarized = apply_byol_release_color_hwc(image, {**NO_COLOUR, "solarize": True}, None)
    np.testing.assert_allclose(solarized, np.where(image < 0.5, image, 1 - image))
    # the release's brightness is not torchvision's factor: x + 0.3 is not 1.3 x
    torchvision = view_primitives.apply_color(torch.from_numpy(image).permute(2, 0, 1),
                                              {**NO_COLOUR, "jitter": True, "order": [0], "brightness": 1.3})
    assert (torchvision.permute(1, 2, 0).numpy() - one(0, brightness=1.3)).__abs__().max() > 0.05


def test_a_sample_is_two_normalised_views_reproducible_from_the_generator():
    transform = BYOLTransform(views_config())
    image = photo()
    a = transform(image, np.zeros((0, 4)), torch.Generator().manual_seed(5))
    b = transform(image, np.zeros((0, 4)), torch.Generator().manual_seed(5))
    assert set(a) == {"views"} and set(a["views"]) == {"v1", "v2"}
    for name in ("v1", "v2"):
        assert a["views"][name].shape == (3, 64, 64) and a["views"][name].dtype == torch.float32
        assert torch.equal(a["views"][name], b["views"][name])
        pixels = denormalize(a["views"][name])
        assert pixels.min() >= 0 and pixels.max() <= 1
    assert not torch.equal(a["views"]["v1"], a["views"]["v2"])
    batch = transform.collate([a, b])
    assert batch["views"]["v1"].shape == (2, 3, 64, 64)
    # colour off: the view is the crop's geometry alone, normalised
    plain = BYOLTransform(views_config("method.views.color_augment=false"))
    generator = torch.Generator().manual_seed(5)
    sample = plain(image, np.zeros((0, 4)), generator)
    first, _ = plain.crops(72, 96, torch.Generator().manual_seed(5))
    expected = plain.geometric_view(torch.from_numpy(image).permute(2, 0, 1), first)
    torch.testing.assert_close(denormalize(sample["views"]["v1"]), expected, atol=1e-6, rtol=0)
    # the torchvision switches run too
    other = BYOLTransform(views_config("method.views.crop_sampling=torchvision", "method.views.color_ops=torchvision"))
    assert other(image, np.zeros((0, 4)), torch.Generator().manual_seed(5))["views"]["v2"].shape == (3, 64, 64)
