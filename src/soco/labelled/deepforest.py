"""The DeepForest tree-crown images as a tiled COCO detection set with a leak-free train/val split.

Source: the wheel of `deepforest==2.1.0` (MIT), fetched with `pip download --no-deps` and read with
zipfile; the deepforest package itself is never installed or imported. Its `deepforest/data/` folder
holds four annotated aerial RGB images (Pascal VOC XML): two large Yellowstone crops and two 400x400
images from other sites. The layout written to `dest`:

    dest/train.json, dest/val.json   COCO detection files, one category "tree" (id 1)
    dest/images/train/*.png          training tiles (file_name "train/<tile>.png" relative to images/)
    dest/images/val/*.png            validation tiles
    dest/split.json                  parameters, sources, regions and every tile's source window
    dest/SPLIT.md                    the same in words

Rules (all in source-image pixels, boxes as continuous corners x1 y1 x2 y2):

* Split first, tile second. The two 400x400 images (`OSBS_029`, `SOAP_061`) go to validation whole;
  each larger image gives its rightmost `val_width` pixels (default: one tile width) to validation and
  the rest to training. Tiles are then cut inside each region separately and never cross a region's
  border, so no validation tile shares a pixel with a training tile.
* Tile grid inside a region: origins 0, T, 2T, ... from the region's top-left corner; when the region's
  size is not a multiple of T, one last row/column is aligned to the region's far edge, so every tile
  holds T x T real pixels and overlaps its neighbour inside the same split (a box in the overlap is
  kept in both tiles). A region smaller than T in one direction gives tiles padded with black on the
  right/bottom.
* A box is kept in a tile, clipped to the tile's real pixels, when at least `min_visible` (default 0.5)
  of its area lies inside them and both clipped sides are at least 1 pixel. Boxes of every label
  ("Tree", "Alive", "Dead") become the single category "tree".
* Tiles left without any box are dropped from both splits (and not written).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from soco.config.validation import MAX_IMAGE_SIDE
from soco.data.image_files import load_rgb
from soco.data.default_photos import default_cache_dir
from soco.errors import DataError, ImageReadError
from soco.files import (atomic_write_text, build_lock, file_sha256, finished_build, folder_build,
                        refuse_foreign_folder)

__all__ = [
    "DISTRIBUTION",
    "VERSION",
    "WHEEL_NAME",
    "VAL_WHOLE_IMAGES",
    "VocAnnotation",
    "SourceImage",
    "Tile",
    "deepforest_dir",
    "parse_voc",
    "read_voc_folder",
    "tile_origins",
    "split_regions",
    "cut_tiles",
    "build_tiled_dataset",
    "cached_wheel_path",
    "download_wheel",
    "extract_data",
    "prepare_deepforest",
    "training_pixels_folder",
    "window_overlap",
]

DISTRIBUTION = "deepforest"
VERSION = "2.1.0"
WHEEL_NAME = f"{DISTRIBUTION}-{VERSION}-py3-none-any.whl"
DATA_PREFIX = "deepforest/data/"
LICENCE = "MIT (deepforest package, weecology)"
CATEGORY = {"id": 1, "name": "tree", "supercategory": "tree"}
# Sites that appear only in these small images: whole images in validation (the brief's split).
VAL_WHOLE_IMAGES = ("OSBS_029", "SOAP_061")
SPLIT_FILE = "split.json"
FORMAT_VERSION = 1
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels, x1/y1 exclusive


@dataclass
class VocAnnotation:
    """One Pascal VOC XML file: the image it names, its declared size, boxes (N, 4) and labels."""

    filename: str
    width: int
    height: int
    boxes: np.ndarray
    labels: list[str]


@dataclass
class SourceImage:
    """An annotated source image ready for tiling: pixels (H, W, 3) uint8 and boxes (N, 4) XYXY."""

    name: str
    pixels: np.ndarray
    boxes: np.ndarray
    labels: list[str] = field(default_factory=list)
    sha256: str = ""

    @property
    def width(self) -> int:
        """Width in pixels."""
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        """Height in pixels."""
        return int(self.pixels.shape[0])


@dataclass
class Tile:
    """One tile: where it comes from, its pixels (T, T, 3) and its boxes in tile coordinates."""

    source: str
    split: str
    origin: tuple[int, int]  # x, y of the tile's top-left corner in the source image
    window: Window  # the source pixels the tile really holds (the rest is padding)
    pixels: np.ndarray
    boxes: np.ndarray  # (N, 4) float XYXY relative to origin

    @property
    def file_name(self) -> str:
        """Path relative to images/, e.g. 'train/OSBS_029_x0000_y0400.png'."""
        return f"{self.split}/{self.source}_x{self.origin[0]:04d}_y{self.origin[1]:04d}.png"


def deepforest_dir(cache_dir: str | Path | None = None) -> Path:
    """Default folder of the tiled set inside a cache folder (default: default_cache_dir())."""
    base = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return base / "deepforest"


def training_pixels_folder(dest: str | Path) -> Path:
    """Folder of the training tiles only: unlabeled pretraining data that holds no validation pixel."""
    folder = Path(dest).expanduser() / "images" / "train"
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist: run `soco data deepforest -o {dest}` first")
    return folder


# ---------------------------------------------------------------------------------------------------
# Reading annotations


def parse_voc(text: str | bytes, source: str = "<xml>") -> VocAnnotation:
    """Parse a Pascal VOC XML annotation; DataError naming `source` when it is not one."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DataError(f"{source}: not valid XML ({exc})") from None
    if root.tag != "annotation":
        raise DataError(f"{source}: not a Pascal VOC annotation (root element <{root.tag}>)")

    def _number(node: ET.Element, path: str) -> float:
        found = node.find(path)
        if found is None or found.text is None:
            raise DataError(f"{source}: missing <{path}>")
        try:
            return float(found.text)
        except ValueError:
            raise DataError(f"{source}: <{path}> is not a number: {found.text!r}") from None

    boxes, labels = [], []
    for obj in root.iter("object"):
        box = [_number(obj, f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
        if box[2] <= box[0] or box[3] <= box[1]:
            continue  # degenerate box: nothing to learn from or to find
        boxes.append(box)
        name = obj.find("name")
        labels.append(name.text.strip() if name is not None and name.text else "")
    filename = root.findtext("filename") or ""
    width = int(_number(root, "size/width")) if root.find("size/width") is not None else 0
    height = int(_number(root, "size/height")) if root.find("size/height") is not None else 0
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return VocAnnotation(filename.strip(), width, height, array, labels)


def _image_for(xml_path: Path, annotation: VocAnnotation) -> Path:
    """The image an XML file describes: a PNG of the same stem first (lossless, plain RGB), else <filename>."""
    candidates = [xml_path.with_suffix(s) for s in _IMAGE_SUFFIXES]
    if annotation.filename:
        candidates.insert(1, xml_path.parent / annotation.filename)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{xml_path}: no image found for it (looked for {', '.join(c.name for c in candidates)})")


def read_voc_folder(folder: str | Path) -> list[SourceImage]:
    """Every (image, VOC XML) pair of a folder, sorted by name; boxes clipped to the image."""
    folder = Path(folder)
    xml_files = sorted(folder.glob("*.xml"))
    if not xml_files:
        raise DataError(f"{folder}: no Pascal VOC .xml annotation file")
    sources = []
    for xml_path in xml_files:
        annotation = parse_voc(xml_path.read_bytes(), str(xml_path))
        image_path = _image_for(xml_path, annotation)
        try:
            pixels = load_rgb(image_path)
        except ImageReadError as exc:
            raise DataError(str(exc)) from None
        height, width = pixels.shape[:2]
        if annotation.width and annotation.height and (annotation.width, annotation.height) != (width, height):
            raise DataError(f"{xml_path}: declares {annotation.width}x{annotation.height} but {image_path.name} "
                            f"is {width}x{height}")
        boxes = annotation.boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        sources.append(SourceImage(xml_path.stem, pixels, boxes, annotation.labels, file_sha256(image_path)))
    return sources


# ---------------------------------------------------------------------------------------------------
# Geometry


def tile_origins(length: int, tile: int) -> list[int]:
    """Tile starts along one axis: 0, tile, 2*tile, ... plus one aligned to the far edge if needed."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, tile))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def split_regions(width: int, height: int, whole_val: bool, val_width: int) -> dict[str, list[Window]]:
    """Train and val regions of one image: all val, or the rightmost `val_width` columns val, the rest train."""
    if whole_val or width <= val_width:
        return {"train": [], "val": [(0, 0, width, height)]}
    boundary = width - val_width
    return {"train": [(0, 0, boundary, height)], "val": [(boundary, 0, width, height)]}


def window_overlap(a: Window, b: Window) -> int:
    """Number of pixels two windows share."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0, w) * max(0, h)


def _boxes_in_window(boxes: np.ndarray, window: Window, min_visible: float) -> np.ndarray:
    """Boxes with at least `min_visible` of their area inside `window`, clipped to it (source coordinates)."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    x0, y0, x1, y1 = window
    clipped = np.stack([
        boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1),
        boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1),
    ], axis=1)
    widths, heights = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # A tiny tolerance so that "exactly half inside" is kept despite float rounding.
    keep = (widths * heights >= min_visible * area - 1e-9) & (widths >= 1.0) & (heights >= 1.0)
    return clipped[keep]


def cut_tiles(source: SourceImage, region: Window, split: str, tile_size: int, min_visible: float) -> list[Tile]:
    """Tiles of one region of a source image (see the module's rules), boxless tiles included."""
    rx0, ry0, rx1, ry1 = region
    tiles = []
    for oy in tile_origins(ry1 - ry0, tile_size):
        for ox in tile_origins(rx1 - rx0, tile_size):
            x0, y0 = rx0 + ox, ry0 + oy
            window = (x0, y0, min(x0 + tile_size, rx1), min(y0 + tile_size, ry1))
            pixels = np.zeros((tile_size, tile_size, 3), dtype=np.uint8)
            pixels[: window[3] - y0, : window[2] - x0] = source.pixels[y0:window[3], x0:window[2]]
            boxes = _boxes_in_window(source.boxes, window, min_visible) - np.array([x0, y0, x0, y0], dtype=np.float64)
            tiles.append(Tile(source.name, split, (x0, y0), window, pixels, boxes))
    return tiles


# ---------------------------------------------------------------------------------------------------
# Writing


def _coco(tiles: list[Tile], description: str) -> dict:
    """A COCO detection dict of tiles (ids from 1; boxes as XYWH; extra keys `source` and `window`)."""
    images, annotations = [], []
    for image_id, tile in enumerate(tiles, start=1):
        height, width = tile.pixels.shape[:2]
        images.append({
            "id": image_id, "file_name": tile.file_name, "width": int(width), "height": int(height),
            "source": tile.source, "window": list(tile.window),
        })
        for box in tile.boxes:
            x, y = float(box[0]), float(box[1])
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY["id"],
                "bbox": [round(x, 3), round(y, 3), round(w, 3), round(h, 3)],
                "area": round(w * h, 3), "iscrowd": 0,
            })
    return {
        "info": {"description": description, "version": FORMAT_VERSION},
        "licenses": [{"id": 1, "name": LICENCE}],
        "images": images, "annotations": annotations, "categories": [dict(CATEGORY)],
    }


def _write_json(path: Path, value: dict) -> None:
    """Write one JSON file of the set atomically."""
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def _split_markdown(record: dict) -> str:
    """SPLIT.md: the split in words, with the numbers of this build."""
    p = record["params"]
    lines = [
        "# DeepForest tiles: train/val split",
        "",
        f"Source: `{p['source']}`; every box label becomes the category `tree` (id 1).",
        "",
        "## Rules",
        f"- Split first, tile second: images {', '.join(p['val_whole_images']) or '(none)'} go to validation whole; "
        f"every other image gives its rightmost {p['val_width']} px columns to validation, the rest to training.",
        f"- Tiles of {p['tile_size']}x{p['tile_size']} px are cut inside each region separately, from its top-left "
        "corner; a last row/column is aligned to the region's far edge (overlapping its neighbour inside the "
        "same split), and a region smaller than a tile is padded with black on the right/bottom.",
        "- No validation tile shares a pixel with a training tile (checked when the set is built).",
        f"- A box is kept in a tile, clipped, when at least {p['min_visible']:.0%} of its area is inside the tile's "
        "real pixels and both clipped sides are at least 1 px; a box in the overlap of two tiles is in both.",
        "- Tiles without any box are dropped.",
        "- `images/train/` (training tiles only) can serve as unlabeled pretraining data without leaking validation "
        "pixels.",
        "",
        "## Regions (source pixels x0, y0, x1, y1; x1, y1 exclusive)",
        "| image | size | boxes | train region | val region |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, info in record["sources"].items():
        train = "; ".join(str(tuple(w)) for w in info["regions"]["train"]) or "-"
        val = "; ".join(str(tuple(w)) for w in info["regions"]["val"]) or "-"
        lines.append(f"| {name} | {info['width']}x{info['height']} | {info['boxes']} | {train} | {val} |")
    lines += ["", "## Counts", "| split | tiles | boxes | tiles dropped (no box) |", "| --- | --- | --- | --- |"]
    for split in ("train", "val"):
        c = record["counts"][split]
        lines.append(f"| {split} | {c['tiles']} | {c['boxes']} | {c['dropped_empty_tiles']} |")
    return "\n".join(lines) + "\n"


def build_tiled_dataset(
    sources: list[SourceImage],
    dest: str | Path,
    tile_size: int = 400,
    min_visible: float = 0.5,
    val_width: int | None = None,
    val_whole_images: tuple[str, ...] = VAL_WHOLE_IMAGES,
    source_note: str = "",
    extra: dict | None = None,
) -> dict:
    """Tile, split and write sources into dest (train/val.json, images/, split.json, SPLIT.md); returns split.json."""
    if not 16 <= tile_size <= MAX_IMAGE_SIDE:
        raise DataError(f"tile size {tile_size} must be 16 to {MAX_IMAGE_SIDE} px")
    if not 0.0 < min_visible <= 1.0:
        raise DataError(f"min_visible must be in (0, 1], got {min_visible}")
    val_width = tile_size if val_width is None else int(val_width)
    if not 1 <= val_width <= MAX_IMAGE_SIDE:
        raise DataError(f"val_width {val_width} must be 1 to {MAX_IMAGE_SIDE} px")
    dest = Path(dest)
    by_split: dict[str, list[Tile]] = {"train": [], "val": []}
    dropped = {"train": 0, "val": 0}
    sources_record = {}
    for source in sources:
        regions = split_regions(source.width, source.height, source.name in val_whole_images, val_width)
        for split, windows in regions.items():
            for region in windows:
                for tile in cut_tiles(source, region, split, tile_size, min_visible):
                    if len(tile.boxes):
                        by_split[split].append(tile)
                    else:
                        dropped[split] += 1
        labels: dict[str, int] = {}
        for label in source.labels:
            labels[label] = labels.get(label, 0) + 1
        sources_record[source.name] = {
            "width": source.width, "height": source.height, "boxes": int(len(source.boxes)),
            "labels": labels, "sha256": source.sha256,
            "regions": {k: [list(w) for w in v] for k, v in regions.items()},
        }

    # The split's promise, verified on the actual tiles rather than trusted from the construction.
    for val_tile in by_split["val"]:
        for train_tile in by_split["train"]:
            if val_tile.source == train_tile.source and window_overlap(val_tile.window, train_tile.window):
                raise AssertionError(f"val tile {val_tile.file_name} overlaps train tile {train_tile.file_name}")

    for split in ("train", "val"):
        folder = dest / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for tile in by_split[split]:
            Image.fromarray(tile.pixels).save(dest / "images" / tile.file_name)
    params = {
        "format": FORMAT_VERSION, "source": source_note or "VOC folder", "tile_size": tile_size,
        "min_visible": min_visible, "val_width": val_width, "val_whole_images": list(val_whole_images),
    }
    for split in ("train", "val"):
        _write_json(dest / f"{split}.json", _coco(by_split[split], f"{params['source']}, {split} tiles"))
    record = {
        "params": params,
        **(extra or {}),
        "sources": sources_record,
        "counts": {
            split: {"tiles": len(tiles), "boxes": int(sum(len(t.boxes) for t in tiles)),
                    "dropped_empty_tiles": dropped[split]}
            for split, tiles in by_split.items()
        },
        "tiles": {split: [{"file_name": t.file_name, "source": t.source, "window": list(t.window),
                           "boxes": int(len(t.boxes))} for t in tiles] for split, tiles in by_split.items()},
    }
    (dest / "SPLIT.md").write_text(_split_markdown(record), encoding="utf-8")
    # Written last: its presence with the same parameters marks a finished build.
    _write_json(dest / SPLIT_FILE, record)
    return record


# ---------------------------------------------------------------------------------------------------
# Fetching the wheel


def cached_wheel_path(cache_dir: str | Path | None = None) -> Path:
    """Where the deepforest wheel is kept: <cache>/downloads/deepforest-2.1.0-py3-none-any.whl."""
    base = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return base / "downloads" / WHEEL_NAME


def _wheel_is_valid(path: Path) -> bool:
    """True when the file is a readable zip whose data members pass their CRC checks."""
    try:
        with zipfile.ZipFile(path) as wheel:
            members = [m for m in wheel.namelist() if m.startswith(DATA_PREFIX)]
            if not members:
                return False
            for member in members:
                with wheel.open(member) as handle:
                    while handle.read(1 << 20):
                        pass  # reading to the end verifies the CRC
        return True
    except (OSError, zipfile.BadZipFile):
        return False


def download_wheel(cache_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """The cached deepforest wheel, fetched with `pip download --no-deps` (registry access) when absent."""
    target = cached_wheel_path(cache_dir)
    if target.is_file() and _wheel_is_valid(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{DISTRIBUTION}=={VERSION}", "-d", tmp]
        if quiet:
            command.append("-q")
        if not quiet:
            print(f"downloading {DISTRIBUTION}=={VERSION} (data only, not installed): {' '.join(command[2:])}")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
            raise DataError(
                f"`pip download {DISTRIBUTION}=={VERSION}` failed (exit {result.returncode}); it needs the package "
                f"registry, or put the wheel at {target} by hand. pip said:\n{tail}"
            )
        wheel = Path(tmp) / WHEEL_NAME
        if not wheel.is_file() or not _wheel_is_valid(wheel):
            raise DataError(f"`pip download` gave no valid {WHEEL_NAME} in {tmp}")
        # pip writes the file itself, so soco.files.atomic_write has no writer to run: the private
        # download folder plays its temporary file, and the checked wheel is renamed into place.
        os.replace(wheel, target)
    return target


def extract_data(wheel: str | Path, folder: str | Path) -> Path:
    """Extract only deepforest/data/* of the wheel into folder (flat); returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                name = member.filename
                if not name.startswith(DATA_PREFIX) or member.is_dir():
                    continue
                relative = name[len(DATA_PREFIX):]
                if "/" in relative or relative.startswith(".") or not relative:
                    continue  # the data folder is flat; anything else is not ours to write
                with archive.open(member) as src, open(folder / relative, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{wheel}: cannot read the wheel ({exc})") from None
    return folder


def prepare_deepforest(
    dest: str | Path | None = None,
    tile_size: int = 400,
    min_visible: float = 0.5,
    val_width: int | None = None,
    cache_dir: str | Path | None = None,
    quiet: bool = False,
) -> Path:
    """Build the tiled DeepForest COCO set in dest (default: <cache>/deepforest); returns at once if already built."""
    dest = deepforest_dir(cache_dir) if dest is None else Path(dest).expanduser()
    val_width = tile_size if val_width is None else int(val_width)
    params = {
        "format": FORMAT_VERSION, "source": f"{DISTRIBUTION}=={VERSION} wheel, {DATA_PREFIX}",
        "tile_size": tile_size, "min_visible": min_visible, "val_width": val_width,
        "val_whole_images": list(VAL_WHOLE_IMAGES),
    }
    if finished_build(dest, SPLIT_FILE, params, ("train.json", "val.json")):
        return dest
    with build_lock(dest, "soco data deepforest"):
        if finished_build(dest, SPLIT_FILE, params, ("train.json", "val.json")):
            return dest  # another process built it while this one waited
        refuse_foreign_folder(dest, SPLIT_FILE)
        wheel = download_wheel(cache_dir, quiet=quiet)
        # Built beside dest and swapped in whole, so that an interrupted build leaves no half set behind.
        with folder_build(dest) as build:
            sources = read_voc_folder(extract_data(wheel, build / "source"))
            build_tiled_dataset(
                sources, build, tile_size, min_visible, val_width, VAL_WHOLE_IMAGES, params["source"],
                extra={"wheel": {"file": WHEEL_NAME, "sha256": file_sha256(wheel)}, "licence": LICENCE},
            )
            shutil.rmtree(build / "source")
    return dest
