"""A labelled multi-class detection set composed offline: photographic cut-outs pasted on the default photos.

The cut-outs are the photographic stamps of the Debian package `tuxpaint-stamps-default` (most of its
stamps are cartoons; `STAMPS` is a hand-checked list of real photographs with clean alpha masks, in seven
classes). Each scene is a random crop of a background photo with a few stamps pasted at random scales
and places; later stamps occlude earlier ones, and every box and mask is read from what stays visible,
so the labels are exact. The stamps and the background photos of the training and validation splits
are disjoint (alternate stamps of each class; alternate groups of near-duplicate photos, such as stereo
pairs and video frames), so a probe or a detector scored on `val` meets objects and photos it never saw.
The scenes are composed: results on them must say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from soco.config.validation import MAX_IMAGE_SIDE
from soco.data.image_files import list_images
from soco.data.default_photos import default_cache_dir
from soco.errors import ConfigError, DataError
from soco.files import (atomic_write_text, build_lock, file_sha256, finished_build, folder_build,
                        refuse_foreign_folder)

__all__ = [
    "PACKAGE",
    "STAMPS",
    "Placement",
    "build_composed",
    "compose_scene",
    "composed_dir",
    "find_stamps",
    "prepare_composed",
    "photo_group",
    "split_alternate",
    "split_photos",
]

PACKAGE = "tuxpaint-stamps-default"
PACKAGE_VERSION = "2022.06.04-1"
DEB_NAME = f"{PACKAGE}_{PACKAGE_VERSION}_all.deb"
DEB_SHA256 = "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34"
STAMPS_IN_PACKAGE = Path("usr/share/tuxpaint/stamps")
SYSTEM_STAMPS = Path("/usr/share/tuxpaint/stamps")
LICENCE = "GPL-2+ (tuxpaint-stamps-default, Debian); background photos as in the default photo set"
FORMAT_VERSION = 1
SPLIT_FILE = "composed.json"
ALPHA_OPAQUE = 128  # a pixel belongs to the object when its alpha reaches half
MIN_VISIBLE = 0.6  # a pasted stamp must keep this share of its pixels visible, or it is not pasted
OBJECTS_PER_SCENE = (2, 5)  # stamps tried per scene, inclusive


def _names(folder: str, names: str) -> tuple[str, ...]:
    """Stamp paths from a folder and space-separated file stems."""
    return tuple(f"{folder}/{name}.png" for name in names.split())


# Hand-checked against contact sheets of every stamp: real photographs only (no cartoons, drawings,
# silhouettes or mirrored duplicates), one object each.
STAMPS: dict[str, tuple[str, ...]] = {
    "bird": _names("animals/birds", (
        "adelaide-rosella albino_peahen blackbird chicken_profile crow crowned_crane cuckoo drake duck gander "
        "guineafowl helmeted_guineafowl hen heron_greatblue heron_greatblue_flying lark little-penguin "
        "magellanic_penguin magpie nandou ostrich owl peacock pelican penguin pigeon pink_flamingo quetzal "
        "rainbow-lorikeet rooster seagull silver-gull tucan turkey vulture")),
    "fruit": _names("food/fruit", (
        "Apricot_whole Cherry_Stella Strawberry2 apple_fuji apple_granny_smith apple_green apple_red "
        "apple_sierra_beauty apricot avocado banana cherimoya grapes kiwi lemon mandarine mango orange "
        "orange_seville pear pineapple pomegranate raspberry sliced_lime sliced_orange strawberry")),
    "vegetable": _names("food/vegetables", (
        "broccoli carrot chilepepper corn eggplant garlic garlics lettuce mushroom onion pattypan_squash "
        "pepper potato pumpkin_small redlettuce tomato yam yellowpepper")),
    "mammal": (
        *_names("animals/mammals", "badger elephant ferret giraffe hippopotamus pig pig_golden pig_golden2 "
                                   "rabbit_little rhino_black wildboar"),
        *_names("animals/mammals/bovines", "bison bull cow cow_white gnu-baby-stand gnu-baby gnu-sitting gnu-stand "
                                           "goat indian_blackbuck mountaingoat ram sheep sheep_lamb yak zebu"),
        *_names("animals/mammals/rodents", "beaver capybara marmot mouse rabbit-2 rabbit rat squirrel"),
        *_names("animals/mammals/cats", "lion-2 lion tiger tiger_sumatran"),
        *_names("animals/mammals/equines", "donkey donkey_eating horse zebra"),
        *_names("animals/mammals/deer", "caribou deer doe wapiti"),
    ),
    "sea_animal": (
        *_names("animals/fish", "bluegroper butterflyfish clownfish coraltrout dolphinfish lionfish lobster "
                                "moonwrasse seahorse shrimp stripedfish"),
        *_names("animals/mammals/aquatic", "dolphin orca sea_lion"),
    ),
    "flower": _names("plants/flowers", (
        "adeenia anemone_red anthoorium appooppanthady bolsom chemparathi daffodil flower1 flower10 flower2 "
        "flower3 flower4 flower5 flower6 flower7 flower8 flower9 iris marigold pigface red-gazania rose "
        "whitestar-petunia yellow-flower")),
    "vehicle": (
        *_names("vehicles/auto", "beetle sedan sportscar2 truck"),
        *_names("vehicles", "garbagetruck"),
        *_names("vehicles/emergency", "firetruck"),
        *_names("military/vehicles", "bradley f22_raptor infantry-stryker"),
    ),
}


def composed_dir(cache_dir: str | Path | None = None) -> Path:
    """Default folder of the composed set: <cache>/composed."""
    base = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return base / "composed"


def split_alternate(items: Sequence[str]) -> dict[str, list[str]]:
    """{'train': even positions, 'val': odd positions} of the sorted items: disjoint, and both splits
    draw from every part of the list."""
    ordered = sorted(items)
    return {"train": ordered[0::2], "val": ordered[1::2]}


# Trailing frame or shot numbers and stereo sides: 'im.002', 'walls-l', 'motorcycle_left', 'rocks2-r'. A side
# needs a separator before it ('wall' keeps its l); numbers go with or without one, so 'rocks1' and 'rocks2'
# share a group too: a group too wide costs only balance between the splits, one too narrow leaks.
_VARIANT_SUFFIX = re.compile(r"([-_. ](l|r|left|right)|[-_. ]?\d+)+$", re.IGNORECASE)


def photo_group(relative_path: str) -> str:
    """The group of near-duplicate photos a file belongs to: its folder and its stem without a trailing frame
    number or stereo side, so that 'seq/im.001' and 'seq/im.002', or 'walls-l' and 'walls-r', share one."""
    path = Path(relative_path)
    stem = _VARIANT_SUFFIX.sub("", path.stem) or path.stem
    return f"{path.parent.as_posix()}/{stem.lower()}"


def split_photos(relative_paths: Sequence[str]) -> dict[str, list[str]]:
    """The photos split by alternate groups of near-duplicates (`photo_group`): no group spans both splits."""
    groups: dict[str, list[str]] = {}
    for relative in sorted(relative_paths):
        groups.setdefault(photo_group(relative), []).append(relative)
    halves = split_alternate(list(groups))
    return {split: [photo for group in names for photo in groups[group]] for split, names in halves.items()}


# ---------------------------------------------------------------------------------------------------
# The stamps


def _missing_stamps(root: Path) -> list[str]:
    """The listed stamps (STAMPS) that root lacks."""
    return [rel for names in STAMPS.values() for rel in names if not (root / rel).is_file()]


def _download_package(cache: Path, quiet: bool) -> Path:
    """The cached, checksum-verified .deb, fetched with `apt-get download` (no install, no root) when absent."""
    target = cache / "downloads" / DEB_NAME
    if target.is_file() and file_sha256(target) == DEB_SHA256:
        return target
    if shutil.which("apt-get") is None:
        raise DataError(f"the stamps of {PACKAGE} are not installed and this machine has no apt-get to fetch "
                        f"{DEB_NAME}: install the package, put the .deb at {target}, or pass --stamps DIR")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".apt-") as tmp:
        command = ["apt-get", "download", f"{PACKAGE}={PACKAGE_VERSION}"]
        if not quiet:
            print(f"downloading {PACKAGE}={PACKAGE_VERSION} (about 160 MB, unpacked here, not installed)")
        result = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        fetched = Path(tmp) / DEB_NAME
        if result.returncode != 0 or not fetched.is_file():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-4:])
            raise DataError(f"`{' '.join(command)}` failed (exit {result.returncode}); it needs the Debian package "
                            f"index (apt-get update), or put {DEB_NAME} at {target}. apt said:\n{tail}")
        if file_sha256(fetched) != DEB_SHA256:
            raise DataError(f"{DEB_NAME} from apt has another checksum than the one the stamp list was checked on")
        os.replace(fetched, target)
    return target


def _installed_version() -> str | None:
    """The version of the installed package, None when dpkg does not know it."""
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def find_stamps(stamps: str | Path | None = None, cache_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """The folder holding the stamps (the package's `.../tuxpaint/stamps`): `stamps` when given, else the
    installed package, else the .deb unpacked into the cache (downloaded once)."""
    if stamps is not None:
        root = Path(stamps).expanduser()
        missing = _missing_stamps(root)
        if missing:
            raise DataError(f"{root}: {len(missing)} of the listed stamps are missing (first: {missing[0]}); "
                            f"point --stamps at the 'stamps' folder of {PACKAGE}")
        return root
    # The installed package only in the version the list was checked on; another one is fetched pinned.
    installed = SYSTEM_STAMPS.is_dir() and _installed_version() == PACKAGE_VERSION
    if installed and not _missing_stamps(SYSTEM_STAMPS):
        return SYSTEM_STAMPS
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    unpacked = cache / "tuxpaint-stamps"
    root = unpacked / STAMPS_IN_PACKAGE
    if root.is_dir() and not _missing_stamps(root):
        return root
    with build_lock(unpacked, "soco data composed"):
        if root.is_dir() and not _missing_stamps(root):
            return root  # another process unpacked it while this one waited
        deb = _download_package(cache, quiet)
        if shutil.which("dpkg-deb") is None:
            raise DataError(f"unpacking {deb} needs dpkg-deb (Debian's dpkg): install it, or unpack the package "
                            f"yourself and pass --stamps <its {STAMPS_IN_PACKAGE}>")
        with folder_build(unpacked) as building:
            result = subprocess.run(["dpkg-deb", "-x", str(deb), str(building)], capture_output=True, text=True)
            if result.returncode != 0:
                raise DataError(f"`dpkg-deb -x {deb}` failed: {result.stderr.strip()}")
    missing = _missing_stamps(root)
    if missing:
        raise DataError(f"{deb}: {len(missing)} listed stamps are not in the package (first: {missing[0]})")
    return root


# ---------------------------------------------------------------------------------------------------
# Composing one scene


@dataclass(frozen=True)
class Placement:
    """One stamp pasted into a scene: its file, class and the top-left corner and size it was pasted at."""

    stamp: str
    category: str
    x: int
    y: int
    width: int
    height: int
    flipped: bool


def _load_stamp(path: Path) -> Image.Image:
    """The stamp as RGBA, cropped to its opaque pixels."""
    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the stamp ({exc})") from None
    box = Image.fromarray((np.asarray(rgba)[..., 3] >= ALPHA_OPAQUE).astype(np.uint8) * 255).getbbox()
    if box is None:
        raise DataError(f"{path}: the stamp has no opaque pixel")
    return rgba.crop(box)


def compose_scene(background: Image.Image, stamps: Sequence[tuple[str, str, Image.Image]], size: int,
                  rng: np.random.Generator, min_side: float = 0.15, max_side: float = 0.5,
                  tries: int = 30) -> tuple[Image.Image, list[Placement], list[np.ndarray]]:
    """(scene, placements, visible masks): a random square crop of `background` resized to `size`, with each
    (name, category, RGBA) of `stamps` pasted in turn at a random place and a longer side of `min_side` to
    `max_side` of the scene, mirrored half the time. A stamp that would leave an earlier one less than
    MIN_VISIBLE of its pixels is tried elsewhere (`tries` times) and then left out (each new stamp lies on top).
    Masks are (size, size) bool arrays of the pixels each kept stamp shows in the final scene."""
    width, height = background.size
    side = int(min(width, height) * rng.uniform(0.6, 1.0))
    left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    scene = background.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size),
                                                                                        Image.Resampling.BILINEAR)
    placements: list[Placement] = []
    masks: list[np.ndarray] = []
    full_areas: list[int] = []
    for name, category, stamp in stamps:
        longer = rng.uniform(min_side, max_side) * size
        scale = longer / max(stamp.size)
        w, h = max(2, round(stamp.width * scale)), max(2, round(stamp.height * scale))
        flipped = bool(rng.random() < 0.5)
        resized = stamp.resize((w, h), Image.Resampling.LANCZOS)
        if flipped:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        alpha = np.asarray(resized)[..., 3] >= ALPHA_OPAQUE
        area = int(alpha.sum())
        if area == 0:
            continue
        for _ in range(tries):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            mask = np.zeros((size, size), dtype=bool)
            mask[y:y + h, x:x + w] = alpha
            if all((earlier & ~mask).sum() >= MIN_VISIBLE * full for earlier, full in zip(masks, full_areas)):
                break
        else:
            continue
        scene.paste(resized, (x, y), resized)
        masks = [earlier & ~mask for earlier in masks] + [mask]
        full_areas.append(area)
        placements.append(Placement(name, category, x, y, w, h, flipped))
    return scene, placements, masks


def _mask_box(mask: np.ndarray) -> list[float]:
    """COCO [x, y, width, height] of the pixels of a mask (pixel edges: a single pixel is 1x1)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


def _rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of a mask, as JSON can hold it."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------------
# The data set


def check_scene_options(images_per_split: Mapping[str, int], size: int, objects: tuple[int, int]) -> None:
    """ConfigError for options no scene can be built with (checked before anything is fetched)."""
    if set(images_per_split) != {"train", "val"}:
        raise ConfigError(f"splits: {sorted(images_per_split)} are not train and val")
    for split, count in images_per_split.items():
        if count < 1:
            raise ConfigError(f"{split} images: {count}; each split needs at least 1")
    if size < 32:
        raise ConfigError(f"size: {size} px is too small for a scene (at least 32)")
    if size > MAX_IMAGE_SIDE:
        raise ConfigError(f"size: {size} px is too large for a scene (at most {MAX_IMAGE_SIDE})")
    if not 1 <= objects[0] <= objects[1]:
        raise ConfigError(f"objects: {objects} is not a range of at least one object")


def build_composed(stamps_root: str | Path, backgrounds_root: str | Path, backgrounds: Sequence[str],
                   dest: str | Path, images_per_split: Mapping[str, int], size: int = 256,
                   objects: tuple[int, int] = OBJECTS_PER_SCENE, seed: int = 0,
                   stamps: Mapping[str, Sequence[str]] | None = None) -> dict[str, Path]:
    """Write images/<split>_NNNN.jpg and <split>.json (COCO, boxes and RLE masks) into dest; {split: json path}.

    `backgrounds`: paths relative to `backgrounds_root`. Stamps are split with `split_alternate`, the photos
    with `split_photos`. Each scene tries `objects` (inclusive range) stamps, of classes drawn uniformly and
    then drawn uniformly from that split's stamps of the class; `compose_scene` may leave some out."""
    stamps_root, dest, backgrounds_root = Path(stamps_root), Path(dest), Path(backgrounds_root)
    stamps = STAMPS if stamps is None else stamps
    check_scene_options(images_per_split, size, objects)
    background_splits = split_photos([str(path) for path in backgrounds])
    if not all(background_splits.values()):
        raise DataError(f"{len(backgrounds)} background photo(s) in fewer than 2 groups of near-duplicates: "
                        "the two splits need one each")
    categories = sorted(stamps)
    stamp_splits = {category: split_alternate(stamps[category]) for category in categories}
    for category, halves in stamp_splits.items():
        if not halves["val"]:
            raise DataError(f"class {category!r} has {len(stamps[category])} stamp(s): both splits need one")
    images_dir = dest / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, Image.Image] = {}
    files = {}
    for split_index, (split, count) in enumerate(sorted(images_per_split.items())):
        rng = np.random.default_rng([seed, split_index])
        coco = {
            "info": {"description": f"soco composed scenes ({split}): photographic stamps of {PACKAGE} "
                                    f"{PACKAGE_VERSION} pasted on the default photos; the scenes are composed",
                     "version": FORMAT_VERSION},
            "licenses": [{"id": 1, "name": LICENCE}],
            "categories": [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(categories)],
            "images": [], "annotations": [],
        }
        for image_index in range(count):
            background_name = background_splits[split][int(rng.integers(len(background_splits[split])))]
            background_path = backgrounds_root / background_name
            try:
                with Image.open(background_path) as background:
                    background.load()
                    chosen = []
                    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
                        category = categories[int(rng.integers(len(categories)))]
                        names = stamp_splits[category][split]
                        name = names[int(rng.integers(len(names)))]
                        if name not in loaded:
                            loaded[name] = _load_stamp(stamps_root / name)
                        chosen.append((name, category, loaded[name]))
                    scene, placements, masks = compose_scene(background, chosen, size, rng)
            except OSError as exc:
                raise DataError(f"{background_path}: cannot read the background photo ({exc})") from None
            file_name = f"{split}_{image_index:04d}.jpg"
            scene.save(images_dir / file_name, quality=92, subsampling=0)  # 4:4:4: small objects keep their colour
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                                   "background": background_name})
            for placement, mask in zip(placements, masks):
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id,
                    "category_id": categories.index(placement.category) + 1,
                    "bbox": _mask_box(mask), "area": float(mask.sum()), "iscrowd": 0,
                    "segmentation": _rle(mask), "stamp": placement.stamp,
                })
        files[split] = dest / f"{split}.json"
        atomic_write_text(files[split], json.dumps(coco))
    return files


def prepare_composed(dest: str | Path | None = None, train_images: int = 300, val_images: int = 150, size: int = 256,
                     seed: int = 0, stamps: str | Path | None = None, backgrounds: str | Path | None = None,
                     cache_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """Build the composed set in dest (default <cache>/composed) unless an identical build is there; returns dest.

    `backgrounds`: a folder of photos (default: the default photo set, assembled if needed)."""
    from soco.data.default_photos import assemble_photos, photos_dir

    splits = {"train": train_images, "val": val_images}
    check_scene_options(splits, size, OBJECTS_PER_SCENE)
    dest = composed_dir(cache_dir) if dest is None else Path(dest).expanduser()
    if backgrounds is None:
        background_root = assemble_photos(photos_dir(cache_dir), progress=not quiet)
    else:
        background_root = Path(backgrounds).expanduser()
        if not background_root.is_dir():
            raise DataError(f"--backgrounds {background_root}: no such folder")
    background_files = list_images(background_root)
    if not background_files:
        raise DataError(f"{background_root}: no readable photo to compose scenes on")
    params = {"format": FORMAT_VERSION, "package": f"{PACKAGE}={PACKAGE_VERSION}", "train_images": train_images,
              "val_images": val_images, "size": size, "seed": seed, "backgrounds": str(background_root),
              "stamps": hashlib.sha256(json.dumps(STAMPS, sort_keys=True).encode()).hexdigest()[:16],
              "stamps_from": str(Path(stamps).expanduser()) if stamps is not None else f"{PACKAGE}={PACKAGE_VERSION}"}
    if finished_build(dest, SPLIT_FILE, params, ("train.json", "val.json")):
        return dest
    with build_lock(dest, "soco data composed"):
        if finished_build(dest, SPLIT_FILE, params, ("train.json", "val.json")):
            return dest  # another process built it while this one waited
        refuse_foreign_folder(dest, SPLIT_FILE)
        stamps_root = find_stamps(stamps, cache_dir, quiet)
        # Built beside dest and swapped in whole, so that an interrupted build leaves no half set behind.
        with folder_build(dest) as build:
            build_composed(stamps_root, background_root, background_files, build, splits, size=size, seed=seed)
            atomic_write_text(build / SPLIT_FILE, json.dumps({"params": params, "stamps_root": str(stamps_root),
                                                              "licence": LICENCE}, indent=2))
    return dest
