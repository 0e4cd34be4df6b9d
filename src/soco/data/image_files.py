"""Finding image files in a folder and decoding them to RGB uint8 arrays."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from soco.errors import DataError, ImageReadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "file_fingerprint",
    "decode_rgb",
    "load_rgb",
    "read_image",
    "image_size",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# EXIF orientations 5..8 turn the stored image by 90 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str | Path, unreadable: dict[str, str] | None = None) -> list[str]:
    """Every image file under root (recursive), as sorted POSIX paths relative to root.

    A subfolder that cannot be read stops the listing with a DataError, unless `unreadable` is given:
    then it is recorded there as {relative folder: reason} and the listing goes on.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DataError(f"image folder {root_path} does not exist")
    if not root_path.is_dir():
        raise DataError(f"{root_path} is not a folder (expected a folder of images)")

    found: list[str] = []
    # Symlinked folders are followed too (image sets are often assembled from links). A
    # folder whose real path is one of its own ancestors is a link cycle and is not entered;
    # two links to the same folder both count, as their files are listed under both names.
    stack: list[tuple[str, str, frozenset[str]]] = [(os.fspath(root_path), "", frozenset())]
    while stack:
        folder, prefix, ancestors = stack.pop()
        real = os.path.realpath(folder)
        if real in ancestors:
            continue
        ancestors = ancestors | {real}
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            if unreadable is None or not prefix:  # an unreadable root leaves nothing to list
                raise DataError(f"cannot read folder {folder}: {exc.strerror or exc}") from exc
            unreadable[prefix.rstrip("/")] = f"cannot read folder ({exc.strerror or exc})"
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            try:
                # is_dir()/is_file() follow symlinks; a broken link is neither and is skipped.
                if entry.is_dir():
                    stack.append((entry.path, rel + "/", ancestors))
                elif entry.is_file() and _is_image_name(entry.name):
                    found.append(rel)
            except OSError:
                continue
    if not found:
        skipped = f" ({len(unreadable)} unreadable folders, e.g. {min(unreadable)})" if unreadable else ""
        raise DataError(
            f"no image found in {root_path}{skipped} (looked for files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}, any letter case; hidden files are skipped)"
        )
    found.sort()
    return found


def file_fingerprint(data: bytes) -> int:
    """64-bit content fingerprint of a file's bytes (blake2b, little-endian), fits numpy uint64."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image, 1 when absent or unreadable."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(im: Image.Image) -> Image.Image:
    """Turn a loaded image upright according to its EXIF orientation."""
    if _orientation(im) == 1:
        return im
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:
        # A damaged EXIF block should not make good pixels unreadable; _orientation
        # returns 1 in the same cases, so image_size stays consistent with this.
        return im
    return im if out is None else out


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend an HxWx4 uint8 RGBA array onto a white background, giving HxWx3 uint8."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    # Integer blend with rounding: alpha 255 keeps the colour exactly, alpha 0 gives 255.
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Map 16-bit values 0..65535 to 0..255 by rounding v / 257 (65535 -> 255, monotonic)."""
    v = values.astype(np.uint32)
    return ((v + 128) // 257).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linearly map the finite range of an array onto 0..255 (non-finite values -> 0)."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.any():
        return np.zeros(v.shape, dtype=np.uint8)
    lo, hi = float(v[finite].min()), float(v[finite].max())
    out = np.zeros(v.shape, dtype=np.float64)
    if hi > lo:
        out[finite] = (v[finite] - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _has_transparency(im: Image.Image) -> bool:
    """Whether a P/L/RGB image carries a transparent colour or palette alpha."""
    flag = getattr(im, "has_transparency_data", None)  # Pillow >= 10.1
    if flag is not None:
        return bool(flag)
    return "transparency" in im.info


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to a contiguous HxWx3 uint8 RGB array."""
    mode = im.mode
    if mode.startswith("I;16"):
        # 16-bit gray (PNG/TIFF): scale to 8 bits; PIL's own convert("L") would clip at 255.
        return _gray_to_rgb(_scale_16bit(np.asarray(im)))
    if mode == "I":
        # 32-bit integer gray; usually 16-bit data (older PIL opened 16-bit PNGs as "I").
        values = np.asarray(im)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _gray_to_rgb(_scale_16bit(values))
        return _gray_to_rgb(_stretch(values))
    if mode == "F":
        # Float gray has no fixed range: [0, 1] and [0, 255] are the usual conventions,
        # anything else is stretched so that the picture stays visible instead of clipping.
        values = np.asarray(im, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            return _gray_to_rgb(np.rint(np.nan_to_num(values) * 255.0).astype(np.uint8))
        if finite.size and finite.min() >= 0.0 and finite.max() <= 255.0:
            return _gray_to_rgb(np.rint(np.nan_to_num(values)).astype(np.uint8))
        return _gray_to_rgb(_stretch(values))
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB") and _has_transparency(im)
    )
    if has_alpha:
        # Transparent pixels are shown as they would appear on a white page (viewers,
        # browsers, product cut-outs); their stored colour is undefined (often black).
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        return _composite_on_white(np.asarray(rgba))
    if mode != "RGB":
        # 1, L, P, CMYK, YCbCr, ...: PIL's converters handle these exactly ("1" -> 0/255).
        # Embedded ICC profiles are ignored, as in torchvision and most training code.
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def decode_rgb(data: bytes, source: str) -> np.ndarray:
    """Decode image bytes to an upright HxWx3 uint8 RGB array; ImageReadError(source, reason) if unreadable."""
    if len(data) == 0:
        raise ImageReadError(source, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            # Multi-frame files (GIF, TIFF) open on their first frame; load() forces the
            # complete decode here, so a truncated file fails now and not later.
            im.load()
            upright = _apply_orientation(im)
            return _to_rgb_array(upright)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(source, f"image too large, refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(source, "not an image file (format not recognised)") from exc
    except EOFError as exc:
        raise ImageReadError(source, "truncated image") from exc
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, MemoryError) as exc:
        text = str(exc)
        if "truncated" in text.lower():
            raise ImageReadError(source, "truncated image") from exc
        if isinstance(exc, MemoryError):
            raise ImageReadError(source, "not enough memory to decode the image") from exc
        if isinstance(exc, ValueError) and "mode" in text.lower():
            raise ImageReadError(source, f"unsupported image mode ({text})") from exc
        raise ImageReadError(source, f"corrupt image data ({type(exc).__name__}: {text})") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise many odd types (struct.error, zlib.error, ...)
        raise ImageReadError(source, f"corrupt image data ({type(exc).__name__}: {exc})") from exc


def _read_bytes(path: str | Path) -> bytes:
    """All bytes of a file; ImageReadError with a short reason when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ImageReadError(str(path), "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageReadError(str(path), "is a folder, not an image file") from exc
    except PermissionError as exc:
        raise ImageReadError(str(path), "permission denied") from exc
    except OSError as exc:
        raise ImageReadError(str(path), f"cannot read file ({exc.strerror or exc})") from exc


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file and decode it to an upright HxWx3 uint8 RGB array."""
    return decode_rgb(_read_bytes(path), str(path))


def read_image(path: str | Path) -> tuple[np.ndarray, int]:
    """(RGB array, 64-bit fingerprint of the file bytes), from a single read of the file."""
    data = _read_bytes(path)
    return decode_rgb(data, str(path)), file_fingerprint(data)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image after EXIF orientation, read from its header without decoding pixels."""
    source = str(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            if _orientation(im) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
            return int(width), int(height)
    except FileNotFoundError as exc:
        raise ImageReadError(source, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageReadError(source, "is a folder, not an image file") from exc
    except PermissionError as exc:
        raise ImageReadError(source, "permission denied") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(source, f"image too large, refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ImageReadError(source, "empty file (0 bytes)") from exc
        raise ImageReadError(source, "not an image file (format not recognised)") from exc
    except EOFError as exc:
        raise ImageReadError(source, "truncated image") from exc
    except Exception as exc:  # noqa: BLE001 - header parsers raise many odd types
        raise ImageReadError(source, f"corrupt image header ({type(exc).__name__}: {exc})") from exc
