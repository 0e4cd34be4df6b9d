"""The BYOL colour pipeline computed with OpenCV on HxWx3 float32 arrays: torchvision's mathematics, faster.

torchvision's tensor kernels take about 15 ms per 224 px view for the hue shift alone (RGB -> HSV -> RGB in
a dozen tensor passes) and 6 ms for the blur; OpenCV's SIMD colour conversion and separable filter do the
same work in a fraction of that. Every operation follows torchvision's definition (its grey weights
0.2989/0.587/0.114, its clamping, its Gaussian kernel and reflect padding), so the result equals
`torchvision.transforms.v2.functional` to float32 rounding (tested in tests/data/test_color.py).

`apply_byol_release_color_hwc` is the other definition of the same pipeline: the one of BYOL's release
(DeepMind's byol/utils/augmentations.py), whose brightness adds, whose contrast keeps each channel's own mean,
whose saturation scales S in HSV, which clips after every jitter op and whose blur pads with zeros.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["GRAY_WEIGHTS", "gaussian_kernel", "apply_color_hwc", "byol_release_blur_kernel_size",
           "apply_byol_release_color_hwc"]

# torchvision's rgb_to_grayscale weights (not OpenCV's 0.299, 0.587, 0.114)
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
_SOLARIZE_THRESHOLD = 0.5


def _gray(image: np.ndarray) -> np.ndarray:
    """HxW grey values with torchvision's weights."""
    return image @ GRAY_WEIGHTS


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    """factor * image + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend for float images)."""
    blended = image * np.float32(factor)
    blended += np.float32(1.0 - factor) * other
    return np.clip(blended, 0.0, 1.0, out=blended)


def _adjust_hue(image: np.ndarray, hue: float) -> np.ndarray:
    """Rotate the hue by `hue` turns (torchvision's adjust_hue) through OpenCV's float HSV (H in degrees)."""
    hue_degrees, saturation, value = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    shift = np.float32(360.0 * hue)  # |hue| <= 0.5 turn: one wrap of 360 degrees at most, no modulo needed
    hue_degrees += shift
    if shift > 0:
        np.subtract(hue_degrees, np.float32(360.0), out=hue_degrees, where=hue_degrees >= 360.0)
    else:
        np.add(hue_degrees, np.float32(360.0), out=hue_degrees, where=hue_degrees < 0.0)
    return cv2.cvtColor(cv2.merge([hue_degrees, saturation, value]), cv2.COLOR_HSV2RGB)


def gaussian_kernel(kernel_size: int, sigma: float) -> np.ndarray:
    """torchvision's 1-D Gaussian kernel: exp(-x^2 / 2 sigma^2) at x = -(k-1)/2 .. (k-1)/2, summing to 1."""
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size, dtype=np.float32)
    pdf = np.exp(-0.5 * np.square(x / np.float32(sigma)))
    return (pdf / pdf.sum()).astype(np.float32)


def _blur(image: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (torch's "reflect" is OpenCV's BORDER_REFLECT_101)."""
    if kernel_size // 2 >= min(image.shape[:2]):
        # reflect padding needs the image wider than the pad: clip the kernel as torch would refuse it
        kernel_size = 2 * ((min(image.shape[:2]) - 1) // 2) + 1
    kernel = gaussian_kernel(kernel_size, sigma)
    return cv2.sepFilter2D(image, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)


def apply_color_hwc(image: np.ndarray, params: dict, blur_kernel_size: int | None) -> np.ndarray:
    """The colour pipeline (jitter in drawn order, grey, blur, solarize) on an HxWx3 float32 [0, 1] array.

    `params` comes from `soco.data.views.draw_color_params`; `blur_kernel_size` is the odd kernel side
    (needed only when params["blur"]). Returns a new array; the input is not modified.
    """
    image = np.array(image, dtype=np.float32, order="C", copy=True)
    if params["jitter"]:
        for op in params["order"]:
            if op == 0:
                image = _blend(image, 0.0, params["brightness"])
            elif op == 1:
                mean = np.float32(_gray(image).mean())
                image = _blend(image, mean, params["contrast"])
            elif op == 2:
                image = _blend(image, _gray(image)[..., None], params["saturation"])
            else:
                image = _adjust_hue(image, params["hue"])
    if params["grayscale"]:
        image = np.repeat(_gray(image)[..., None], 3, axis=2)
    if params["blur"]:
        image = _blur(image, blur_kernel_size, params["sigma"])
    if params["solarize"]:
        image = np.where(image >= np.float32(_SOLARIZE_THRESHOLD), np.float32(1.0) - image, image)
    return image


# --- BYOL's release (DeepMind, byol/utils/augmentations.py) ----------------------------------------------------


def _clip(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0.0, 1.0, out=image)


def _scale_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """S x factor clipped to [0, 1] in HSV, back to RGB (augmentations.py:250-251, 272-276)."""
    hue, saturation, value = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    saturation = np.clip(saturation * np.float32(factor), 0.0, 1.0)
    return cv2.cvtColor(cv2.merge([hue, saturation, value]), cv2.COLOR_HSV2RGB)


def byol_release_blur_kernel_size(side: int, divider: float = 10.0) -> int:
    """The release's blur kernel: side / divider as a float, radius int(half of it), kernel 2 radius + 1.

    augmentations.py:423 (kernel_size = H / blur_divider) and 135-136 (radius = int(kernel_size / 2)): 23 at
    224 px, 9 at 96, 7 at 64, 1 (no blur) below 20.
    """
    return 2 * int(side / divider / 2) + 1


def apply_byol_release_color_hwc(image: np.ndarray, params: dict, blur_kernel_size: int | None) -> np.ndarray:
    """BYOL's release colour pipeline on an HxWx3 float32 [0, 1] array, parameters from `draw_color_params`.

    With params["jitter"] the four ops run in params["order"] (0 brightness, 1 contrast, 2 saturation, 3 hue),
    each clipped to [0, 1] (augmentations.py:312-342): brightness adds params["brightness"] - 1, a delta
    U(-0.4, 0.4) (239-240, 261-263); contrast scales each channel about its own spatial mean (243-247, 266-269);
    saturation scales S in HSV (250-251); hue turns H by params["hue"] (254-258). Then grey with the weights
    0.2989/0.587/0.114 (285-288, 345-347), the Gaussian blur of `blur_kernel_size` with zero ('SAME') padding
    (133-151), solarize below 0.5 kept, above inverted (434-437), and a final clip (98). Returns a new array.
    """
    image = np.array(image, dtype=np.float32, order="C", copy=True)
    if params["jitter"]:
        for op in params["order"]:
            if op == 0:
                image = _clip(image + np.float32(params["brightness"] - 1.0))
            elif op == 1:
                mean = image.mean(axis=(0, 1), keepdims=True, dtype=np.float32)
                image = _clip(np.float32(params["contrast"]) * (image - mean) + mean)
            elif op == 2:
                image = _clip(_scale_saturation(image, params["saturation"]))
            else:
                image = _clip(_adjust_hue(image, params["hue"]))
    if params["grayscale"]:
        image = np.repeat(_gray(image)[..., None], 3, axis=2)
    if params["blur"] and blur_kernel_size and blur_kernel_size > 1:
        kernel = gaussian_kernel(blur_kernel_size, params["sigma"])
        image = cv2.sepFilter2D(image, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_CONSTANT)
    if params["solarize"]:
        image = np.where(image < np.float32(_SOLARIZE_THRESHOLD), image, np.float32(1.0) - image)
    return _clip(np.ascontiguousarray(image, dtype=np.float32))
