"""The proposal store: one folder of memory-mapped arrays, opened in milliseconds, O(1) lookup.

Layout of a store folder (all arrays little-endian .npy, opened with mmap):
    meta.json          format name and version, algorithm and parameters, filter rules, counts
    path_bytes.npy     uint8, every image path (relative to the image folder, UTF-8) concatenated
    path_offsets.npy   int64 (n+1,), path i is path_bytes[path_offsets[i]:path_offsets[i+1]]
    path_table.npy     int64 open-addressing hash table: slot -> image index or -1 (O(1) lookup)
    sizes.npy          int32 (n, 2), width and height after EXIF orientation (0 for failures)
    fingerprints.npy   uint64 (n,), 64-bit BLAKE2b of each image file's bytes
    byte_sizes.npy     int64 (n,), each image file's size in bytes (a cheap first check)
    levels.npy         int8 (n,), the filter's fallback level (0..3), or -1 for an unreadable image
    raw_counts.npy     int32 (n,), proposals before the filter
    box_offsets.npy    int64 (n+1,), boxes of image i are boxes[box_offsets[i]:box_offsets[i+1]]
    boxes.npy          float32 (total, 4), x1 y1 x2 y2 in original-image pixels
    failures.json      {path: reason} for unreadable images, and for unreadable folders (path ends in "/")
meta.json is written last, so a folder without it is not a finished store. Opening a store checks that
these files agree with each other (shapes, offsets, counts), so one damaged value is refused by name
instead of handing an image another image's boxes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soco.errors import ProposalStoreError
from soco.files import atomic_write, atomic_write_text

STORE_FORMAT = "soco-proposals"
STORE_VERSION = 1
FAILED_LEVEL = -1
# Every array of a store with its dtype and shape; "n" is the number of images, None any length.
_ARRAY_LAYOUT = {
    "path_bytes": ("uint8", (None,)),
    "path_offsets": ("int64", ("n+1",)),
    "path_table": ("int64", (None,)),
    "sizes": ("int32", ("n", 2)),
    "fingerprints": ("uint64", ("n",)),
    "byte_sizes": ("int64", ("n",)),
    "levels": ("int8", ("n",)),
    "raw_counts": ("int32", ("n",)),
    "box_offsets": ("int64", ("n+1",)),
    "boxes": ("float32", (None, 4)),
}
_ARRAYS = tuple(_ARRAY_LAYOUT)
STORE_FILES = (*(f"{name}.npy" for name in _ARRAYS), "failures.json")
FAILURES_FILE = "failures.json"
_SUMMED = ("path_offsets", "box_offsets")  # the arrays that say which path and boxes are whose


@dataclass
class ImageRecord:
    """Everything the store keeps about one image (also the unit of the resumable work log)."""

    path: str
    fingerprint: int
    byte_size: int
    width: int
    height: int
    level: int  # FilterLevel value, or FAILED_LEVEL
    raw_count: int
    boxes: np.ndarray  # (n, 4) float32
    reason: str = ""  # why the image failed; empty for success


def path_hash(path_bytes: bytes) -> int:
    """64-bit hash of a path's UTF-8 bytes, the key of the lookup table."""
    return int.from_bytes(hashlib.blake2b(path_bytes, digest_size=8).digest(), "little")


def listing_digest(paths: list[str]) -> str:
    """A short digest of a sorted path listing: the identity of an image folder's contents."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        digest.update(path.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def image_listing(images_root: str | Path) -> tuple[list[str], dict[str, str]]:
    """Sorted store paths of a folder (images, and unreadable folders as "sub/"), and {"sub/": reason}."""
    from soco.data.image_files import list_images

    unreadable: dict[str, str] = {}
    paths = list_images(images_root, unreadable=unreadable)
    folders = {f"{folder}/": reason for folder, reason in unreadable.items()}
    return sorted([*paths, *folders]), folders


def is_folder_entry(path: str) -> bool:
    """Whether a store path stands for an unreadable folder rather than an image."""
    return path.endswith("/")


def left_out_message(store: ProposalStore) -> str | None:
    """The line a training run logs about images its store has no proposals for; None when there are none."""
    if store.failed_count == 0:
        return None
    failures = store.failures()
    folders = sum(is_folder_entry(path) for path in failures)
    images = len(failures) - folders
    parts = [f"{images} image{'s' if images != 1 else ''} left out (failed proposals)"] if images else []
    if folders:
        parts.append(f"{folders} unreadable folder{'s' if folders != 1 else ''} left out")
    return f"{', '.join(parts)}: see {store.failures_file}"


def _build_path_table(encoded_paths: list[bytes]) -> np.ndarray:
    """Open-addressing hash table with linear probing, at most half full."""
    size = 1
    while size < 2 * max(1, len(encoded_paths)):
        size *= 2
    table = np.full(size, -1, dtype=np.int64)
    mask = size - 1
    for index, encoded in enumerate(encoded_paths):
        slot = path_hash(encoded) & mask
        while table[slot] != -1:
            slot = (slot + 1) & mask
        table[slot] = index
    return table


def no_space_error(path: str | Path) -> ProposalStoreError:
    """The one-line error of a disk that filled up while `path` was written."""
    return ProposalStoreError(
        f"no space left on device while writing {path}; the work so far is kept, "
        "free some space and run the same command again to continue"
    )


def _atomic_save_array(folder: Path, name: str, array: np.ndarray) -> None:
    """Save one array atomically, so a killed writer never leaves a half file."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save given a path would pick the suffix itself
            np.save(handle, array)

    atomic_write(folder / f"{name}.npy", write)


def write_store(folder: str | Path, records: list[ImageRecord], meta: dict) -> Path:
    """Write a finished store for `records` (sorted by path here), with `meta` merged into meta.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # the store is unfinished until the new meta.json lands
    records = sorted(records, key=lambda r: r.path)
    paths = [r.path for r in records]
    if len(set(paths)) != len(paths):
        raise ProposalStoreError(f"{folder}: duplicate image paths among the records")
    encoded = [p.encode("utf-8") for p in paths]
    n = len(records)
    path_offsets = np.zeros(n + 1, dtype=np.int64)
    path_offsets[1:] = np.cumsum([len(e) for e in encoded])
    box_counts = np.array([len(r.boxes) for r in records], dtype=np.int64)
    box_offsets = np.zeros(n + 1, dtype=np.int64)
    box_offsets[1:] = np.cumsum(box_counts)
    boxes = (
        np.concatenate([np.asarray(r.boxes, np.float32).reshape(-1, 4) for r in records])
        if n
        else np.zeros((0, 4), np.float32)
    )
    arrays = {
        "path_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "path_offsets": path_offsets,
        "path_table": _build_path_table(encoded),
        "sizes": np.array([[r.width, r.height] for r in records], dtype=np.int32).reshape(n, 2),
        "fingerprints": np.array([r.fingerprint for r in records], dtype=np.uint64),
        "byte_sizes": np.array([r.byte_size for r in records], dtype=np.int64),
        "levels": np.array([r.level for r in records], dtype=np.int8),
        "raw_counts": np.array([r.raw_count for r in records], dtype=np.int32),
        "box_offsets": box_offsets,
        "boxes": boxes.astype(np.float32),
    }
    failures = {r.path: r.reason for r in records if r.level == FAILED_LEVEL}
    writing = folder
    try:
        for name, array in arrays.items():
            writing = folder / f"{name}.npy"
            _atomic_save_array(folder, name, array)
        writing = folder / FAILURES_FILE
        atomic_write_text(writing, json.dumps(failures, indent=1, sort_keys=True))
        writing = meta_path
        _write_meta(meta_path, meta, arrays, paths)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise no_space_error(writing) from None
        raise
    return folder


def _offset_sums(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """Sums of the offset arrays: a wrong value that keeps them increasing still changes its sum."""
    return {name: int(np.asarray(arrays[name]).sum(dtype=np.int64)) for name in _SUMMED}


def _write_meta(meta_path: Path, meta: dict, arrays: dict[str, np.ndarray], paths: list[str]) -> None:
    """meta.json, the file whose arrival finishes a store."""
    n, box_offsets, levels = len(paths), arrays["box_offsets"], arrays["levels"]
    full_meta = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        **meta,
        "num_images": n,
        "num_boxes": int(box_offsets[-1]),
        "num_failed": int((levels == FAILED_LEVEL).sum()),
        "num_fallback": {str(level): int((levels == level).sum()) for level in (1, 2, 3)},
        "listing_digest": listing_digest(paths),
        "offset_sums": _offset_sums(arrays),
    }
    atomic_write_text(meta_path, json.dumps(full_meta, indent=2, sort_keys=True))


def is_store(folder: str | Path) -> bool:
    """True when `folder` holds a finished store."""
    return (Path(folder) / "meta.json").is_file()


def _not_a_store_error(folder: Path) -> ProposalStoreError:
    """Why `folder` (an existing path without meta.json) is not a store, with what to do instead."""
    from soco.data.image_files import IMAGE_EXTENSIONS

    if not folder.is_dir():
        return ProposalStoreError(f"{folder} is a file, not a proposal store (a store is a folder)")
    if (folder / "parts" / "run.json").is_file():
        return ProposalStoreError(
            f"{folder} is not a finished proposal store (its run stopped before the end); "
            "run the same `soco proposals` command again to finish it"
        )
    hint = ""
    if _holds_images(folder, IMAGE_EXTENSIONS):
        hint = f"; it holds images: make a store of them with `soco proposals {folder} -o STORE`"
    return ProposalStoreError(f"{folder} is not a proposal store (no meta.json){hint}")


def _holds_images(folder: Path, extensions: tuple[str, ...], budget: int = 2000) -> bool:
    """Whether an image file lies in `folder` or one level below (looking at `budget` entries at most)."""
    for visited, (_, subfolders, files) in enumerate(os.walk(folder)):
        if any(name.lower().endswith(extensions) for name in files):
            return True
        budget -= len(files) + len(subfolders)
        if budget <= 0:
            return False
        if visited:  # below the top: one level down is enough to recognise an image folder
            subfolders.clear()
    return False


def _damaged(file: Path, problem: str) -> ProposalStoreError:
    """The one-line error of a store file that is unreadable or disagrees with the others."""
    return ProposalStoreError(
        f"proposal store file {file} {problem}: the store is damaged; delete {file.parent} and run "
        "`soco proposals` again"
    )


def _check_consistency(folder: Path, arrays: dict[str, np.ndarray], meta: dict, failures: dict) -> None:
    """Refuse a store whose files disagree (vectorised: a few milliseconds for a million images)."""
    n = len(arrays["path_offsets"]) - 1
    for name, (dtype, shape) in _ARRAY_LAYOUT.items():
        array, file = arrays[name], folder / f"{name}.npy"
        expected = tuple({"n": n, "n+1": n + 1}.get(d, d) for d in shape)
        if array.dtype.newbyteorder("<") != np.dtype(dtype).newbyteorder("<"):
            raise _damaged(file, f"has dtype {array.dtype}, expected {dtype}")
        if array.ndim != len(expected) or any(e is not None and e != a for e, a in zip(expected, array.shape)):
            wanted = "x".join("any" if e is None else str(e) for e in expected)
            raise _damaged(file, f"has shape {array.shape}, expected {wanted} for {n} images")
    if n < 0 or meta.get("num_images") != n:
        raise _damaged(folder / "path_offsets.npy", f"lists {n} images, meta.json says {meta.get('num_images')}")
    for name, total_name, total in (
        ("path_offsets", "path_bytes.npy length", len(arrays["path_bytes"])),
        ("box_offsets", "number of boxes in boxes.npy", len(arrays["boxes"])),
    ):
        offsets = arrays[name]
        if offsets[0] != 0:
            raise _damaged(folder / f"{name}.npy", f"starts at {offsets[0]}, not 0")
        if n and (offsets[1:] < offsets[:-1]).any():
            where = int(np.flatnonzero(offsets[1:] < offsets[:-1])[0])
            raise _damaged(folder / f"{name}.npy", f"decreases at image {where} ({offsets[where]} > {offsets[where + 1]})")
        if offsets[-1] != total:
            raise _damaged(folder / f"{name}.npy", f"ends at {offsets[-1]}, the {total_name} is {total}")
    recorded = meta.get("offset_sums") or {}  # absent in stores written before it was added
    for name, total in _offset_sums(arrays).items():
        if name in recorded and recorded[name] != total:
            raise _damaged(folder / f"{name}.npy", f"sums to {total}, meta.json recorded {recorded[name]} (a value changed)")
    if meta.get("num_boxes") != len(arrays["boxes"]):
        raise _damaged(folder / "boxes.npy", f"holds {len(arrays['boxes'])} boxes, meta.json says {meta.get('num_boxes')}")
    table = arrays["path_table"]
    if len(table) < max(1, n) or len(table) & (len(table) - 1):
        raise _damaged(folder / "path_table.npy", f"has {len(table)} slots for {n} images (need a power of 2 >= n)")
    levels = arrays["levels"]
    if n and (levels.min() < FAILED_LEVEL or levels.max() > 3):
        raise _damaged(folder / "levels.npy", f"holds levels outside {FAILED_LEVEL}..3")
    failed = levels == FAILED_LEVEL
    failed_count = int(failed.sum())
    if len(failures) != failed_count or meta.get("num_failed", failed_count) != failed_count:
        raise _damaged(
            folder / FAILURES_FILE,
            f"lists {len(failures)} failures, levels.npy marks {failed_count} images failed "
            f"and meta.json says {meta.get('num_failed')}",
        )
    if failed_count and (arrays["box_offsets"][1:][failed] != arrays["box_offsets"][:-1][failed]).any():
        raise _damaged(folder / "box_offsets.npy", "gives boxes to an image marked failed")


def _load_json(file: Path):
    """A store's JSON file, or a one-line error naming it when it is missing, empty or unparsable."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _damaged(file, "is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise _damaged(file, f"cannot be read ({error})") from None
    if not text.strip():
        raise _damaged(file, "is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _damaged(file, f"is truncated or unparsable ({error})") from None


class ProposalStore:
    """Read-only view of a finished store; arrays are memory-mapped, so opening costs almost nothing."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not self.folder.exists():
            raise ProposalStoreError(f"proposal store {self.folder} does not exist")
        if not meta_path.is_file():
            raise _not_a_store_error(self.folder)
        self.meta = _load_json(meta_path)
        if not isinstance(self.meta, dict) or self.meta.get("format") != STORE_FORMAT:
            raise ProposalStoreError(f"{self.folder}: not a soco proposal store ({meta_path} names another format)")
        if self.meta.get("version") != STORE_VERSION:
            raise ProposalStoreError(
                f"{self.folder}: store format version {self.meta.get('version')}, "
                f"this soco reads version {STORE_VERSION}"
            )
        arrays = {}
        for name in _ARRAYS:
            file = self.folder / f"{name}.npy"
            try:
                arrays[name] = np.load(file, mmap_mode="r")
            except FileNotFoundError:
                raise _damaged(file, "is missing") from None
            except (OSError, ValueError, EOFError) as error:
                problem = "is empty (0 bytes)" if file.is_file() and file.stat().st_size == 0 else (
                    f"is truncated or unparsable ({type(error).__name__}: {error})"
                )
                raise _damaged(file, problem) from None
        failures_path = self.folder / FAILURES_FILE
        self._failures = _load_json(failures_path)
        if not isinstance(self._failures, dict):
            raise _damaged(failures_path, "is not a {path: reason} object")
        _check_consistency(self.folder, arrays, self.meta, self._failures)
        for name, array in arrays.items():
            setattr(self, f"_{name}", array)

    def __len__(self) -> int:
        return len(self._path_offsets) - 1

    @property
    def algorithm(self) -> str:
        """Name of the proposal algorithm that made this store."""
        return self.meta["algorithm"]

    @property
    def sizes(self) -> np.ndarray:
        """(n, 2) int32 image width and height."""
        return self._sizes

    @property
    def fingerprints(self) -> np.ndarray:
        """(n,) uint64 content fingerprints."""
        return self._fingerprints

    @property
    def byte_sizes(self) -> np.ndarray:
        """(n,) int64 image file sizes in bytes."""
        return self._byte_sizes

    @property
    def levels(self) -> np.ndarray:
        """(n,) int8 fallback levels, -1 for failed images."""
        return self._levels

    @property
    def raw_counts(self) -> np.ndarray:
        """(n,) int32 proposals before the filter."""
        return self._raw_counts

    @property
    def box_counts(self) -> np.ndarray:
        """(n,) int64 kept proposals per image."""
        return np.diff(self._box_offsets)

    def path(self, index: int) -> str:
        """Relative path of image `index`."""
        start, end = self._path_offsets[index], self._path_offsets[index + 1]
        return bytes(self._path_bytes[start:end]).decode("utf-8")

    def paths(self) -> list[str]:
        """Every relative path, in store order (sorted)."""
        return [self.path(i) for i in range(len(self))]

    def index_of(self, path: str) -> int:
        """Index of an image by its relative path, in O(1); KeyError if absent."""
        encoded = path.encode("utf-8")
        table = self._path_table
        mask = len(table) - 1
        slot = path_hash(encoded) & mask
        count = len(self)
        while True:
            index = int(table[slot])
            if index == -1:
                raise KeyError(path)
            if not 0 <= index < count:  # checked here, not at opening: reading the whole table costs
                raise _damaged(self.folder / "path_table.npy", f"points to image {index} of {count}")
            start, end = self._path_offsets[index], self._path_offsets[index + 1]
            if bytes(self._path_bytes[start:end]) == encoded:
                return index
            slot = (slot + 1) & mask

    def __contains__(self, path: str) -> bool:
        try:
            self.index_of(path)
        except KeyError:
            return False
        return True

    def boxes(self, index_or_path: int | str) -> np.ndarray:
        """(n, 4) float32 kept boxes of one image, by index or relative path."""
        index = self.index_of(index_or_path) if isinstance(index_or_path, str) else index_or_path
        return np.asarray(self._boxes[self._box_offsets[index] : self._box_offsets[index + 1]])

    def failures(self) -> dict[str, str]:
        """{path: reason} for every image that could not be read (and folder, path ending in "/")."""
        return dict(self._failures)

    @property
    def failed_count(self) -> int:
        """How many images (and unreadable folders) have no proposals, so training leaves them out."""
        return int(self.meta["num_failed"])

    @property
    def failures_file(self) -> Path:
        """The file listing every failure with its reason."""
        return self.folder / FAILURES_FILE

    def valid_indices(self) -> np.ndarray:
        """Indices of images that were read successfully."""
        return np.flatnonzero(self._levels != FAILED_LEVEL)

    def record(self, index: int) -> ImageRecord:
        """The full record of one image."""
        path = self.path(index)
        width, height = (int(v) for v in self._sizes[index])
        level = int(self._levels[index])
        reason = self._failures.get(path, "") if level == FAILED_LEVEL else ""
        return ImageRecord(
            path=path,
            fingerprint=int(self._fingerprints[index]),
            byte_size=int(self._byte_sizes[index]),
            width=width,
            height=height,
            level=level,
            raw_count=int(self._raw_counts[index]),
            boxes=self.boxes(index),
            reason=reason,
        )

    def check_images(self, images_root: str | Path, fingerprint_sample: int | None = 256) -> None:
        """Refuse images that are not the ones this store was made from (listing, sizes, fingerprints).

        Every readable image's size is compared (a stat each); fingerprints for an evenly spread sample
        of `fingerprint_sample` of them, or for all of them when it is None. Failed images are not
        checked: training leaves them out.
        """
        from soco.data.image_files import file_fingerprint

        images_root = Path(images_root)
        paths, _ = image_listing(images_root)
        update = f"run `soco proposals {images_root} -o {self.folder}` to update the store"
        if listing_digest(paths) != self.meta["listing_digest"]:
            ours = set(self.paths())
            extra = sorted(set(paths) - ours)
            missing = sorted(ours - set(paths))
            same_folder = str(Path(images_root).expanduser().resolve()) == self.meta.get("images_root")
            if same_folder:
                raise ProposalStoreError(
                    f"proposal store {self.folder} was made for another image folder than {images_root} is now "
                    f"({len(extra)} images added, e.g. {extra[:3]}; {len(missing)} removed, e.g. {missing[:3]}): "
                    f"{update}"
                )
            raise ProposalStoreError(
                f"proposal store {self.folder} was made for another image folder "
                f"({self.meta.get('images_root')}, {len(self)} images) than {images_root} "
                f"({len(paths)} images); not in the store: {extra[:3] or 'none'}; "
                f"not in the folder: {missing[:3] or 'none'}"
            )
        readable = self.valid_indices()
        sizes = self.byte_sizes
        for index in readable:
            file = images_root / paths[index]
            try:
                size = file.stat().st_size
            except OSError:
                size = -1
            if size != sizes[index]:
                raise ProposalStoreError(
                    f"{file} changed since proposal store {self.folder} was made (file size differs): {update}"
                )
        count = len(readable)
        sample = readable if fingerprint_sample is None or fingerprint_sample >= count else (
            readable[np.linspace(0, count - 1, fingerprint_sample).astype(int)]
        )
        for index in sample:
            file = images_root / paths[index]
            try:
                fingerprint = file_fingerprint(file.read_bytes())
            except OSError:
                fingerprint = None
            if fingerprint != int(self.fingerprints[index]):
                raise ProposalStoreError(
                    f"{file} changed since proposal store {self.folder} was made "
                    f"(content fingerprint differs): {update}"
                )

    def disk_bytes(self) -> int:
        """Bytes the store occupies on disk."""
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())
