"""Pascal VOC XML annotations to COCO detection files, one per ImageSets/Main split.

Input layout (any folder laid out as VOC2007/VOC2012 is):

    DIR/Annotations/<id>.xml        one <annotation> per image
    DIR/JPEGImages/<filename>       the image each XML names (<filename>, else <id>.jpg)
    DIR/ImageSets/Main/<split>.txt  optional: one image id per line (train, val, trainval, test, ...)

Each split file gives `<split>.json`; without split files every XML goes to `all.json`. The per-class
files of ImageSets/Main (`aeroplane_train.txt`: "<id> 1/-1/0" per line) are recognised by their two
columns and skipped. Image ids are 1..N in the sorted order of all the XML stems, so an image keeps one
id in every split; file_name is relative to JPEGImages/.

Coordinates: VOC's <xmin>..<xmax> are 1-based pixel indices, both ends inside the box, so the box
covers the continuous range [xmin - 1, xmax] in COCO's 0-based pixel-edge coordinates (pixel i covers
[i, i + 1)). The COCO bbox is therefore [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]; this is
Detectron2's conversion (x1 -= 1, x2 kept). A box reaching past the image is clipped to it and counted;
one left without area is dropped and counted.

`<difficult>1</difficult>` objects are kept with `iscrowd: 1`: COCO evaluation then treats them as
ignore regions (a detection on one is neither a true nor a false positive, as in VOC's own metric) and
`soco transfer` does not train on them.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from soco.data.image_files import image_size
from soco.errors import DataError, ImageReadError
from soco.files import atomic_write_text

__all__ = [
    "VocConversion",
    "VocImage",
    "VocObject",
    "convert_voc",
    "parse_voc_xml",
    "read_split_files",
    "voc_to_coco",
]

ANNOTATIONS_DIR = "Annotations"
IMAGES_DIR = "JPEGImages"
SPLITS_DIR = Path("ImageSets") / "Main"
ALL_SPLIT = "all"


@dataclass
class VocObject:
    """One <object>: class name, VOC box (xmin, ymin, xmax, ymax; 1-based, inclusive) and difficult flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass
class VocImage:
    """One XML file: the image id (file stem), the image file it names, its declared size and objects."""

    stem: str
    filename: str
    width: int | None
    height: int | None
    objects: list[VocObject]


@dataclass
class VocConversion:
    """What convert_voc wrote: files per split, and counts of images, boxes, difficult, clipped and dropped."""

    files: dict[str, Path] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    boxes: dict[str, int] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    difficult: int = 0
    clipped: int = 0
    dropped: int = 0
    empty_splits: list[Path] = field(default_factory=list)  # split files with no image id: nothing written

    def lines(self) -> list[str]:
        """What to print: one line per split file, then the conversion's corrections."""
        out = [f"{split}: {self.images[split]} images, {self.boxes[split]} boxes -> {path}"
               for split, path in self.files.items()]
        out.extend(f"{path.stem}: {path} holds no image id; no {path.stem}.json written" for path in self.empty_splits)
        out.append(f"{len(self.categories)} categories: {', '.join(self.categories)}")
        notes = [f"{self.difficult} difficult objects kept as iscrowd=1 (ignored by COCO AP)"]
        if self.clipped:
            notes.append(f"{self.clipped} boxes clipped to their image")
        if self.dropped:
            notes.append(f"{self.dropped} boxes dropped (no area inside their image)")
        out.append("; ".join(notes))
        return out


def _text(node: ET.Element, path: str, source: Path) -> str:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise DataError(f"{source}: missing <{path}>")
    return found.text.strip()


def _number(node: ET.Element, path: str, source: Path) -> float:
    text = _text(node, path, source)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{source}: <{path}> is not a number: {text!r}") from None


def parse_voc_xml(path: str | Path) -> VocImage:
    """Read one VOC annotation file; DataError naming the file when it is not valid VOC XML."""
    path = Path(path)
    try:
        root = ET.fromstring(path.read_bytes())
    except ET.ParseError as exc:
        raise DataError(f"{path}: not valid XML ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: not a Pascal VOC annotation (root element <{root.tag}>)")
    objects = []
    for obj in root.findall("object"):
        name = _text(obj, "name", path)
        box = tuple(_number(obj, f"bndbox/{k}", path) for k in ("xmin", "ymin", "xmax", "ymax"))
        difficult = obj.findtext("difficult", "0").strip() not in ("0", "")
        objects.append(VocObject(name, box, difficult))
    size = root.find("size")
    width = height = None
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width, height = int(_number(root, "size/width", path)), int(_number(root, "size/height", path))
        if width <= 0 or height <= 0:  # some tools write 0 when they did not know: the image header decides
            width = height = None
    return VocImage(path.stem, (root.findtext("filename") or "").strip(), width, height, objects)


def read_split_files(folder: Path) -> dict[str, list[str]]:
    """{split: image ids} of ImageSets/Main/*.txt, per-class files (two columns) left out."""
    splits = {}
    for path in sorted((folder / SPLITS_DIR).glob("*.txt")):
        rows = [line.split() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        rows = [row for row in rows if row]
        if not rows:
            splits[path.stem] = []  # an empty split: said in the summary, no file written for it
        elif all(len(row) == 1 for row in rows):
            splits[path.stem] = [row[0] for row in rows]
        elif any(len(row) != 2 for row in rows):
            raise DataError(f"{path}: neither a split file (one image id per line) nor a per-class file "
                            "(id and 1/-1/0 per line)")
    return splits


def _image_file(folder: Path, image: VocImage, xml_path: Path) -> Path:
    """The image an XML file describes: JPEGImages/<filename>, else JPEGImages/<stem>.jpg."""
    images = folder / IMAGES_DIR
    # Only the name: a <filename> with folders in it (some tools write full paths) still means JPEGImages/.
    candidates = [images / Path(image.filename).name] if image.filename else []
    candidates.append(images / f"{image.stem}.jpg")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{xml_path}: its image is missing (looked for "
                    f"{', '.join(str(c) for c in dict.fromkeys(candidates))})")


def voc_to_coco(image: VocImage, image_id: int, file_name: str, width: int, height: int,
                category_ids: dict[str, int], first_annotation_id: int) -> tuple[dict, list[dict], int, int]:
    """(COCO image entry, its annotations, boxes clipped, boxes dropped) of one VOC image of a known size."""
    annotations, clipped, dropped = [], 0, 0
    for obj in image.objects:
        xmin, ymin, xmax, ymax = obj.box
        if not all(math.isfinite(value) for value in obj.box):  # nan or inf: no box, dropped like one outside
            dropped += 1
            continue
        # 1-based inclusive pixel indices -> 0-based pixel edges (see the module docstring).
        x1, y1, x2, y2 = xmin - 1.0, ymin - 1.0, xmax, ymax
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if cx2 <= cx1 or cy2 <= cy1:
            dropped += 1
            continue
        clipped += (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
        w, h = cx2 - cx1, cy2 - cy1
        annotations.append({
            "id": first_annotation_id + len(annotations), "image_id": image_id,
            "category_id": category_ids[obj.name], "bbox": [cx1, cy1, w, h], "area": w * h,
            "iscrowd": int(obj.difficult),
        })
    entry = {"id": image_id, "file_name": file_name, "width": width, "height": height}
    return entry, annotations, clipped, dropped


def _category_names(images: list[tuple[Path, VocImage]], classes: list[str] | None) -> list[str]:
    """The categories in id order: `classes` as given (every object's class must be among them), else sorted."""
    found = {}
    for xml_path, image in images:
        for obj in image.objects:
            found.setdefault(obj.name, xml_path)
    if classes is None:
        return sorted(found)
    if len(set(classes)) != len(classes):
        raise DataError(f"--classes names a class twice: {', '.join(classes)}")
    unknown = sorted(name for name in found if name not in classes)
    if unknown:
        raise DataError(f"{found[unknown[0]]}: class {unknown[0]!r} is not among --classes "
                        f"({', '.join(classes)})" + (f"; nor are {', '.join(unknown[1:])}" if unknown[1:] else ""))
    return list(classes)


def convert_voc(folder: str | Path, output: str | Path, classes: list[str] | None = None) -> VocConversion:
    """Write one COCO detection file per split of a VOC folder into `output`; returns what was written."""
    folder, output = Path(folder).expanduser(), Path(output).expanduser()
    annotations_dir = folder / ANNOTATIONS_DIR
    if not annotations_dir.is_dir():
        raise DataError(f"{folder}: no {ANNOTATIONS_DIR}/ folder (not a Pascal VOC folder)")
    if not (folder / IMAGES_DIR).is_dir():
        raise DataError(f"{folder}: no {IMAGES_DIR}/ folder (not a Pascal VOC folder)")
    xml_files = sorted(annotations_dir.glob("*.xml"))
    if not xml_files:
        raise DataError(f"{annotations_dir}: no .xml annotation file")
    splits = read_split_files(folder) or {ALL_SPLIT: [p.stem for p in xml_files]}
    empty_splits = [folder / SPLITS_DIR / f"{split}.txt" for split, ids in splits.items() if not ids]
    if len(empty_splits) == len(splits):
        raise DataError(f"{folder / SPLITS_DIR}: every split file is empty ({', '.join(p.name for p in empty_splits)})")
    splits = {split: ids for split, ids in splits.items() if ids}
    stems = {p.stem: p for p in xml_files}
    for split, ids in splits.items():
        missing = [i for i in ids if i not in stems]
        if missing:
            raise DataError(f"{folder / SPLITS_DIR / (split + '.txt')}: {len(missing)} image id(s) have no "
                            f"{ANNOTATIONS_DIR}/<id>.xml: {', '.join(missing[:5])}")
    used = sorted({i for ids in splits.values() for i in ids})
    parsed = [(stems[stem], parse_voc_xml(stems[stem])) for stem in used]
    names = _category_names(parsed, classes)
    if not names:
        raise DataError(f"{annotations_dir}: no <object> in any annotation file")
    category_ids = {name: i + 1 for i, name in enumerate(names)}

    result = VocConversion(categories=names, empty_splits=empty_splits)
    entries = {}
    next_annotation_id = 1
    for image_id, (xml_path, image) in enumerate(parsed, start=1):
        path = _image_file(folder, image, xml_path)
        try:
            width, height = image_size(path)
        except ImageReadError as exc:
            raise DataError(f"{exc} (named in {xml_path})") from None
        if image.width is not None and (image.width, image.height) != (width, height):
            raise DataError(f"{xml_path}: declares {image.width}x{image.height} but {path.name} is "
                            f"{width}x{height}")
        file_name = path.relative_to(folder / IMAGES_DIR).as_posix()
        entry, annotations, clipped, dropped = voc_to_coco(image, image_id, file_name, width, height,
                                                           category_ids, next_annotation_id)
        next_annotation_id += len(annotations)
        result.clipped += clipped
        result.dropped += dropped
        result.difficult += sum(ann["iscrowd"] for ann in annotations)
        entries[image.stem] = (entry, annotations)

    categories = [{"id": category_ids[name], "name": name, "supercategory": "none"} for name in names]
    output.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        chosen = [entries[stem] for stem in sorted(set(ids))]
        data = {
            "info": {"description": f"Pascal VOC {folder.name} {split}, converted by soco data voc",
                     "images_dir": str((folder / IMAGES_DIR).resolve())},
            "images": [entry for entry, _ in chosen],
            "annotations": [ann for _, annotations in chosen for ann in annotations],
            "categories": categories,
        }
        path = output / f"{split}.json"
        atomic_write_text(path, json.dumps(data))
        result.files[split] = path
        result.images[split] = len(data["images"])
        result.boxes[split] = len(data["annotations"])
    return result
