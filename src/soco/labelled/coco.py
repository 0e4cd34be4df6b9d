"""COCO-format detection data for torchvision detectors: strict loading, tv_tensors targets, flip augmentation."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from soco.data.image_files import image_size, load_rgb
from soco.errors import DataError, ImageReadError

__all__ = [
    "BoxReport",
    "CocoDetection",
    "category_name",
    "check_same_categories",
    "collate",
    "has_masks",
    "load_coco_json",
    "plain_target",
    "usable_box",
]


_log = logging.getLogger(__name__)

# Why an annotation's box is not used as it is written (BoxReport keys, in the order reports list them).
CLIPPED = "clipped to the image"
DROPPED_NO_SIZE = "zero or negative width/height"
DROPPED_OUTSIDE = "outside the image"


def usable_box(bbox, width: int, height: int) -> tuple[list[float] | None, str | None]:
    """(XYXY box clipped to a width x height image, or None when dropped; why it changed, or None when it did not)."""
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, DROPPED_NO_SIZE
    box = [min(max(x, 0.0), width), min(max(y, 0.0), height),
           min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, DROPPED_OUTSIDE  # torchvision's detectors reject boxes without area
    return box, (CLIPPED if box != [x, y, x + w, y + h] else None)


@dataclass
class BoxReport:
    """What loading did to a file's boxes: how many were kept, clipped, dropped (by reason) or crowd."""

    path: str
    total: int = 0
    crowd: int = 0
    kept: int = 0
    clipped: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def usable(self) -> int:
        """Boxes a detector trains on or is scored against: kept as written plus clipped."""
        return self.kept + self.clipped

    def changed(self) -> bool:
        """Whether any box was clipped or dropped."""
        return bool(self.clipped or sum(self.dropped.values()))

    def line(self) -> str:
        """'<file>: 40 boxes: 37 used as written, 2 clipped to the image, 1 dropped (outside the image: 1)'."""
        return f"{self.path}: {self.summary()}"

    def summary(self) -> str:
        """The counts in words, without the file name."""
        if not self.total:
            return "no annotation at all"
        parts = [f"{self.kept} used as written"]
        if self.clipped:
            parts.append(f"{self.clipped} {CLIPPED}")
        if self.dropped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.dropped.items()))
            parts.append(f"{sum(self.dropped.values())} dropped ({reasons})")
        if self.crowd:
            parts.append(f"{self.crowd} crowd (ignore regions, never trained on)")
        return f"{self.total} boxes: {', '.join(parts)}"

    def as_dict(self) -> dict:
        """The counts as plain JSON values."""
        return {"total": self.total, "crowd": self.crowd, "kept": self.kept, "clipped": self.clipped,
                "dropped": dict(sorted(self.dropped.items()))}


def _fail(path: Path, message: str) -> DataError:
    return DataError(f"{path}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_coco_json(path: str | Path) -> dict:
    """Read and check a COCO detection file; DataError naming the file when it is missing or not COCO."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"annotation file {path} does not exist")
    if not path.is_file():
        raise DataError(f"annotation file {path} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not a JSON file ({exc})") from None
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise _fail(path, "not a COCO annotation file (top level is not an object)")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise _fail(path, f"not a COCO annotation file (no list {', '.join(repr(k) for k in missing)})")
    if not data["categories"]:
        raise _fail(path, "has no category")

    category_ids = set(_category_names(path, data["categories"]))
    image_ids = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int):
            raise _fail(path, f"images[{i}] has no integer 'id'")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise _fail(path, f"images[{i}] (id {image['id']}) has no 'file_name'")
        if image["id"] in image_ids:
            raise _fail(path, f"image id {image['id']} appears twice")
        image_ids.add(image["id"])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise _fail(path, f"annotations[{i}] is not an object")
        if ann.get("image_id") not in image_ids:
            raise _fail(path, f"annotations[{i}] refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise _fail(path, f"annotations[{i}] has category_id {ann.get('category_id')!r}, "
                              f"which is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise _fail(path, f"annotations[{i}] has no 'bbox' of 4 numbers [x, y, width, height]: {bbox!r}")
    return data


def _category_names(path: Path, categories: list) -> dict[int, str]:
    """id -> name of a file's categories; DataError naming the file for a missing id, a repeated id or name."""
    names: dict[int, str] = {}
    owners: dict[str, int] = {}
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise _fail(path, f"categories[{i}] has no integer 'id'")
        cid, name = category["id"], category_name(category)
        if cid in names:
            # Which of the two a box means cannot be told: the labels would silently follow one of them.
            raise _fail(path, f"category id {cid} appears twice, as {names[cid]!r} and as {name!r}")
        if name in owners:
            # Two ids of one name would make the check of a validation file against training ambiguous.
            raise _fail(path, f"category name {name!r} is given to two ids, {owners[name]} and {cid}")
        names[cid], owners[name] = name, cid
    return names


def category_name(category: dict) -> str:
    """A category's name as the files compare and show it: its 'name', else its id."""
    return str(category.get("name", category["id"]))


def check_same_categories(train: CocoDetection, other: CocoDetection) -> None:
    """DataError naming both files and the first category id whose name differs: a class must mean the same in each.

    Validation and test files are numbered by the training file's ids (see CocoDetection's `categories`), so an id
    named differently would score one class's boxes as another's.
    """
    train_names = {c["id"]: category_name(c) for c in train.data["categories"]}
    for category in sorted(other.data["categories"], key=lambda c: c["id"]):
        cid, name = category["id"], category_name(category)
        if cid in train_names and name != train_names[cid]:
            raise DataError(f"{other.annotation_file}: category {cid} is {name!r}, but {train_names[cid]!r} in "
                            f"{train.annotation_file}: the two files must share one category list")


def has_masks(data: dict) -> bool:
    """True when some non-crowd annotation carries a non-empty 'segmentation' (polygons or RLE)."""
    return any(ann.get("segmentation") and not ann.get("iscrowd", 0) for ann in data["annotations"])


def _mask_of(ann: dict, height: int, width: int) -> np.ndarray:
    """The (H, W) uint8 mask of an annotation: its polygons or RLE, else its box filled (no outline given)."""
    from pycocotools import mask as mask_utils

    segmentation = ann.get("segmentation")
    if not segmentation:
        x, y, w, h = ann["bbox"]
        out = np.zeros((height, width), dtype=np.uint8)
        out[int(math.floor(y)):int(math.ceil(y + h)), int(math.floor(x)):int(math.ceil(x + w))] = 1
        return out
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():
        # pycocotools' compiled decoder trips a NumPy 2 DeprecationWarning about __array__(copy=...).
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(np.uint8)


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets of a COCO file: (tv_tensors.Image float in [0, 1], {boxes XYXY, labels, image_id[, masks]}).

    Category ids map to contiguous labels 1..C in increasing id order (0 is the background of torchvision's
    detectors); `categories` fixes the map from another set (validation takes the training set's). Crowd
    annotations are skipped, boxes are clipped to the image and empty ones dropped: `box_report` counts
    them by reason (logged as a warning when any box changed), and a training set without one usable box
    is refused with a DataError naming the file. In training mode each
    image is flipped horizontally with probability `flip_prob`, decided by (seed, epoch, index) alone so
    that the augmentation is the same whatever the worker count and after a resume.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        images_dir: str | Path,
        train: bool = False,
        flip_prob: float = 0.5,
        masks: bool = False,
        seed: int = 0,
        categories: list[int] | None = None,
    ):
        self.annotation_file = Path(annotation_file).expanduser()
        self.images_dir = Path(images_dir).expanduser()
        self.data = load_coco_json(self.annotation_file)
        self.train = train
        self.flip_prob = float(flip_prob)
        self.masks = masks
        self.seed = int(seed)
        self.epoch = 0
        own = sorted(c["id"] for c in self.data["categories"])
        self.category_ids = list(categories) if categories is not None else own
        unknown = sorted(set(own) - set(self.category_ids))
        used = {ann["category_id"] for ann in self.data["annotations"]}
        if unknown and used & set(unknown):
            raise DataError(f"{self.annotation_file}: category ids {sorted(used & set(unknown))} are not among "
                            f"the training categories {self.category_ids}")
        self.category_to_label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.label_to_category = {label: cid for cid, label in self.category_to_label.items()}
        names = {c["id"]: category_name(c) for c in self.data["categories"]}
        self.category_names = {cid: names.get(cid, str(cid)) for cid in self.category_ids}
        self.images = sorted(self.data["images"], key=lambda image: image["id"])
        self.annotations: dict[int, list[dict]] = {image["id"]: [] for image in self.images}
        for ann in self.data["annotations"]:
            self.annotations[ann["image_id"]].append(ann)
        if not self.images_dir.is_dir():
            raise DataError(f"image folder {self.images_dir} (for {self.annotation_file}) does not exist")
        missing = [image["file_name"] for image in self.images if not (self.images_dir / image["file_name"]).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(f"{len(missing)} of the {len(self.images)} images named in {self.annotation_file} are "
                            f"missing from {self.images_dir}: {shown}")
        self._flip = v2.RandomHorizontalFlip(p=1.0)
        self.box_report = self._check_boxes()
        if self.box_report.changed():
            _log.warning(self.box_report.line())
        if train and not self.box_report.usable:
            raise DataError(f"{self.annotation_file}: no usable box to train on ({self.box_report.summary()})")

    def _declared_size(self, index: int) -> tuple[int, int]:
        """(width, height) of the index-th image: as the file declares it, else from the image's header."""
        info = self.images[index]
        if isinstance(info.get("width"), int) and isinstance(info.get("height"), int):
            return info["width"], info["height"]
        try:
            return image_size(self.images_dir / info["file_name"])
        except ImageReadError as exc:
            raise DataError(f"{exc} (named in {self.annotation_file})") from None

    def _check_boxes(self) -> BoxReport:
        """Count, without decoding any image, which boxes __getitem__ will use as written, clip or drop."""
        report = BoxReport(str(self.annotation_file))
        for index, info in enumerate(self.images):
            annotations = self.annotations[info["id"]]
            if not annotations:
                continue
            width, height = self._declared_size(index)
            for ann in annotations:
                report.total += 1
                if ann.get("iscrowd", 0):
                    report.crowd += 1
                    continue
                box, change = usable_box(ann["bbox"], width, height)
                if box is None:
                    report.dropped[change] += 1
                elif change:
                    report.clipped += 1
                else:
                    report.kept += 1
        return report

    def __len__(self) -> int:
        """Number of images (with or without boxes)."""
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips __getitem__ draws."""
        self.epoch = int(epoch)

    def image_id(self, index: int) -> int:
        """COCO image id of the index-th image."""
        return int(self.images[index]["id"])

    def num_boxes(self) -> int:
        """Non-crowd annotations in the file."""
        return sum(1 for ann in self.data["annotations"] if not ann.get("iscrowd", 0))

    def flips(self, index: int) -> bool:
        """Whether the index-th image is flipped in the current epoch (always False outside training)."""
        if not self.train or self.flip_prob <= 0.0:
            return False
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        return bool(rng.random() < self.flip_prob)

    def load_image(self, index: int) -> np.ndarray:
        """The index-th image as an upright (H, W, 3) uint8 RGB array (gray and RGBA converted)."""
        info = self.images[index]
        path = self.images_dir / info["file_name"]
        try:
            pixels = load_rgb(path)
        except ImageReadError as exc:
            raise DataError(f"{exc} (named in {self.annotation_file})") from None
        height, width = pixels.shape[:2]
        declared = (info.get("height"), info.get("width"))
        if all(isinstance(v, int) for v in declared) and declared != (height, width):
            raise DataError(f"{path} is {width}x{height} but {self.annotation_file} says "
                            f"{declared[1]}x{declared[0]}")
        return pixels

    def __getitem__(self, index: int):
        """(image, target) of the index-th image, augmented in training mode."""
        pixels = self.load_image(index)
        height, width = pixels.shape[:2]
        # Decoded arrays can be read-only views of PIL's buffer; torch wants memory it may own.
        array = pixels if pixels.flags.writeable else pixels.copy()
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0))
        boxes, labels, masks = [], [], []
        for ann in self.annotations[self.image_id(index)]:
            if ann.get("iscrowd", 0):
                continue
            box, _ = usable_box(ann["bbox"], width, height)
            if box is None:
                continue  # counted in box_report
            boxes.append(box)
            labels.append(self.category_to_label[ann["category_id"]])
            if self.masks:
                masks.append(_mask_of(ann, height, width))
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width),
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": self.image_id(index),
        }
        if self.masks:
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        if self.flips(index):
            image, target = self._flip(image, target)
        return image, target


def collate(batch: list) -> tuple[list, list]:
    """Keep images and targets as lists: detectors take images of different sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def plain_target(target: dict, device: torch.device) -> dict:
    """A target with plain tensors on `device` (tv_tensors subclasses stripped), as the detectors expect."""
    out = {}
    for key, value in target.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.as_subclass(torch.Tensor).to(device)
        else:
            out[key] = value
    return out
