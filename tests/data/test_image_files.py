"""Tests of soco.data.image_files: listing image folders and decoding files to RGB uint8."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from soco.data.image_files import (
    IMAGE_EXTENSIONS,
    decode_rgb,
    file_fingerprint,
    image_size,
    list_images,
    load_rgb,
    read_image,
)
from soco.errors import DataError, ImageReadError


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _noise(h=64, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- list_images


def test_list_images_nested_tree_exact_sorted(tmp_path):
    for rel in [
        "b.png",
        "a.JPG",
        "z.Jpeg",
        "sub/c.jpeg",
        "sub/deep/d.TIFF",
        "sub/deep/e.tif",
        "sub/f.WebP",
        "sub/g.bmp",
        "notes.txt",
        "sub/readme.md",
        "noext",
        "sub/fake.jpg.txt",
        ".hidden.jpg",
        ".hiddendir/h.jpg",
        "sub/.cache/i.png",
    ]:
        _write(tmp_path / rel, b"x")
    assert list_images(tmp_path) == [
        "a.JPG",
        "b.png",
        "sub/c.jpeg",
        "sub/deep/d.TIFF",
        "sub/deep/e.tif",
        "sub/f.WebP",
        "sub/g.bmp",
        "z.Jpeg",
    ]
    # str and Path give the same answer
    assert list_images(str(tmp_path)) == list_images(tmp_path)


def test_list_images_follows_symlinks_without_looping(tmp_path):
    outside = tmp_path / "outside"
    _write(outside / "x.png", b"x")
    _write(outside / "more" / "y.jpg", b"y")
    root = tmp_path / "root"
    _write(root / "a.png", b"a")
    os.symlink(outside / "x.png", root / "link.png")
    os.symlink(outside / "more", root / "linked_dir")
    os.symlink(root, root / "loop")  # a cycle must not hang or duplicate
    os.symlink(tmp_path / "missing.png", root / "broken.png")  # dangling link: skipped
    assert list_images(root) == ["a.png", "link.png", "linked_dir/y.jpg"]
    # a second link to an already listed folder lists its files under that name too
    os.symlink(outside / "more", root / "alias")
    assert list_images(root) == ["a.png", "alias/y.jpg", "link.png", "linked_dir/y.jpg"]


def test_list_images_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        list_images(missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


def test_list_images_file_instead_of_folder(tmp_path):
    f = _write(tmp_path / "one.jpg", b"x")
    with pytest.raises(DataError) as info:
        list_images(f)
    assert str(f) in str(info.value)
    assert "not a folder" in str(info.value)


def test_list_images_empty_folder_names_extensions(tmp_path):
    _write(tmp_path / "notes.txt", b"x")
    _write(tmp_path / ".hidden.png", b"x")
    with pytest.raises(DataError) as info:
        list_images(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "no image" in msg
    for ext in IMAGE_EXTENSIONS:
        assert ext in msg


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_equal_bytes_equal_and_one_byte_differs():
    data = bytes(range(256)) * 4
    changed = bytearray(data)
    changed[500] ^= 1
    fp = file_fingerprint(data)
    assert fp == file_fingerprint(bytes(bytearray(data)))
    assert fp != file_fingerprint(bytes(changed))
    assert 0 <= fp < 2**64
    assert int(np.array([fp], dtype=np.uint64)[0]) == fp
    # the documented definition, on a known input
    import hashlib

    assert file_fingerprint(b"soco") == int.from_bytes(
        hashlib.blake2b(b"soco", digest_size=8).digest(), "little"
    )


def test_read_image_returns_pixels_and_fingerprint_of_file(tmp_path):
    rgb = _noise(8, 12)
    data = _encode(Image.fromarray(rgb), "PNG")
    path = _write(tmp_path / "n.png", data)
    out, fp = read_image(path)
    assert fp == file_fingerprint(data)
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(load_rgb(str(path)), rgb)


# ---------------------------------------------------------------- EXIF orientation


def _oriented_jpeg(orientation: int | None) -> bytes:
    """40 wide x 20 high JPEG: left half red, right half blue."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    if orientation is None:
        return _encode(im, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(im, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    path = _write(tmp_path / "rot.jpg", _oriented_jpeg(6))
    out = load_rgb(path)
    assert out.shape == (40, 20, 3)
    assert out.dtype == np.uint8
    # Orientation 6: the display is the stored image turned 90 degrees clockwise,
    # so the stored left half (red) ends up on top and the right half (blue) below.
    top = out[:16].reshape(-1, 3).mean(axis=0)
    bottom = out[24:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 230 and top[2] < 25
    assert bottom[2] > 230 and bottom[0] < 25


def test_no_exif_keeps_stored_layout(tmp_path):
    out = load_rgb(_write(tmp_path / "plain.jpg", _oriented_jpeg(None)))
    assert out.shape == (20, 40, 3)
    assert out[10, 5, 0] > 230 and out[10, 35, 2] > 230


def test_image_size_honours_exif_orientation(tmp_path):
    assert image_size(_write(tmp_path / "rot6.jpg", _oriented_jpeg(6))) == (20, 40)
    assert image_size(_write(tmp_path / "rot8.jpg", _oriented_jpeg(8))) == (20, 40)
    assert image_size(_write(tmp_path / "rot3.jpg", _oriented_jpeg(3))) == (40, 20)
    assert image_size(_write(tmp_path / "plain.jpg", _oriented_jpeg(None))) == (40, 20)


def test_image_size_agrees_with_decoded_shape(tmp_path):
    for orientation in range(1, 9):
        path = _write(tmp_path / f"o{orientation}.jpg", _oriented_jpeg(orientation))
        h, w, _ = load_rgb(path).shape
        assert image_size(path) == (w, h), orientation


# ---------------------------------------------------------------- modes


def test_mode_L_gray_repeated():
    im = Image.new("L", (5, 3), 77)
    im.putpixel((4, 2), 200)
    out = decode_rgb(_encode(im, "PNG"), "l.png")
    assert out.shape == (3, 5, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [77, 77, 77]
    assert out[2, 4].tolist() == [200, 200, 200]


def test_mode_1_bilevel_is_0_or_255():
    im = Image.new("1", (4, 2), 0)
    im.putpixel((1, 0), 1)
    im.putpixel((3, 1), 1)
    out = decode_rgb(_encode(im, "PNG"), "bw.png")
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    expected = np.array([[0, 255, 0, 0], [0, 0, 0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))


def test_mode_LA_composited_on_white():
    arr = np.array([[[100, 255], [100, 0], [100, 128]]], dtype=np.uint8)
    im = Image.fromarray(arr, "LA")
    out = decode_rgb(_encode(im, "PNG"), "la.png")
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    # opaque keeps the value, transparent is white, half: (100*128 + 255*127) / 255 = 177.7
    assert out[0, :, 0].tolist() == [100, 255, 177]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_mode_RGBA_composited_on_white():
    arr = np.array(
        [[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 0], [200, 100, 0, 51]]], dtype=np.uint8
    )
    out = decode_rgb(_encode(Image.fromarray(arr, "RGBA"), "PNG"), "rgba.png")
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [255, 255, 255]
    # alpha 51 = 20%: 0.2*colour + 0.8*255
    assert out[0, 3].tolist() == [244, 224, 204]


def _palette_image() -> Image.Image:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    return im


def test_mode_P_palette():
    out = decode_rgb(_encode(_palette_image(), "PNG"), "p.png")
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_mode_P_with_transparency_index():
    data = _encode(_palette_image(), "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_rgb(data, "pt.png")
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]
    # GIF keeps a transparent index the same way
    gif = decode_rgb(_encode(_palette_image(), "GIF", transparency=1), "pt.gif")
    assert gif[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]


def test_mode_CMYK():
    im = Image.new("CMYK", (3, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 0))
    im.putpixel((2, 0), (0, 0, 0, 255))
    out = decode_rgb(_encode(im, "TIFF"), "cmyk.tif")
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def test_mode_I16_scaled_not_clipped():
    values = np.array([[0, 128, 129, 257, 32768, 65278, 65535]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    data = _encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_rgb(data, "g16.png")
    assert out.shape == (1, 7, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 128, 254, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_mode_I16_full_ramp_is_monotonic():
    ramp = np.arange(0, 65536, 3, dtype=np.uint16)
    ramp[-1] = 65535
    out = decode_rgb(_encode(Image.fromarray(ramp[None, :]), "PNG"), "ramp.png")[0, :, 0]
    assert out[0] == 0 and out[-1] == 255
    assert (np.diff(out.astype(int)) >= 0).all()
    assert len(np.unique(out)) == 256  # all 8-bit levels used, nothing clipped


def test_mode_I32_and_F():
    i16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert i16.mode == "I"
    assert decode_rgb(_encode(i16, "TIFF"), "i.tif")[0, :, 0].tolist() == [0, 128, 255]
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f01.mode == "F"
    assert decode_rgb(_encode(f01, "TIFF"), "f.tif")[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32))
    assert decode_rgb(_encode(wide, "TIFF"), "w.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_multi_frame_gif_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    out = decode_rgb(buf.getvalue(), "anim.gif")
    assert out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [255, 0, 0]


def test_multi_frame_tiff_gives_first_frame():
    frames = [Image.new("RGB", (4, 2), c) for c in [(0, 255, 0), (9, 9, 9)]]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    out = decode_rgb(buf.getvalue(), "multi.tif")
    assert out.shape == (2, 4, 3)
    assert out[1, 3].tolist() == [0, 255, 0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_common_formats_round_trip(fmt):
    rgb = _noise(6, 10, seed=3)
    lossless = {"WEBP": {"lossless": True}, "JPEG": {"quality": 100, "subsampling": 0}}.get(fmt, {})
    out = decode_rgb(_encode(Image.fromarray(rgb), fmt, **lossless), f"x.{fmt.lower()}")
    assert out.shape == (6, 10, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    if fmt == "JPEG":
        assert np.abs(out.astype(int) - rgb).mean() < 3
    else:
        np.testing.assert_array_equal(out, rgb)


# ---------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_is_an_error(tmp_path, fmt, ext):
    data = _encode(Image.fromarray(_noise()), fmt)
    path = _write(tmp_path / f"cut.{ext}", data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert info.value.reason == "truncated image"
    # the error must not have switched PIL into accepting truncated files
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageReadError):
        read_image(path)


def test_text_file_named_jpg(tmp_path):
    path = _write(tmp_path / "notes.jpg", b"this is not a picture\n" * 10)
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    assert str(path) in str(info.value)
    assert "not an image file" in info.value.reason
    with pytest.raises(ImageReadError) as info:
        image_size(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = _write(tmp_path / "empty.png", b"")
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    assert str(path) in str(info.value) and "empty" in info.value.reason
    with pytest.raises(ImageReadError):
        image_size(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError) as info:
        load_rgb(tmp_path / "absent.jpg")
    assert "absent.jpg" in str(info.value) and info.value.reason == "file not found"
    with pytest.raises(ImageReadError):
        image_size(tmp_path / "absent.jpg")
    with pytest.raises(ImageReadError):
        load_rgb(tmp_path)


def test_decompression_bomb_refused(monkeypatch, tmp_path):
    path = _write(tmp_path / "big.png", _encode(Image.new("RGB", (40, 20)), "PNG"))
    # 800 pixels is more than twice this limit, which is where PIL refuses outright
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    assert "decompression bomb" in info.value.reason
    with pytest.raises(ImageReadError):
        image_size(path)
