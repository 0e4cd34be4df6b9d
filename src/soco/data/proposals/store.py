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
    failures.json      {path: reason} for unreadable images
meta.json is written last, so a folder without it is not a finished store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soco.errors import ProposalStoreError
from soco.files import atomic_write, atomic_write_text

STORE_FORMAT = "soco-proposals"
STORE_VERSION = 1
FAILED_LEVEL = -1
_ARRAYS = (
    "path_bytes",
    "path_offsets",
    "path_table",
    "sizes",
    "fingerprints",
    "byte_sizes",
    "levels",
    "raw_counts",
    "box_offsets",
    "boxes",
)


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
    for name, array in arrays.items():
        _atomic_save_array(folder, name, array)
    failures = {r.path: r.reason for r in records if r.level == FAILED_LEVEL}
    atomic_write_text(folder / "failures.json", json.dumps(failures, indent=1, sort_keys=True))
    levels = arrays["levels"]
    full_meta = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        **meta,
        "num_images": n,
        "num_boxes": int(box_offsets[-1]),
        "num_failed": int((levels == FAILED_LEVEL).sum()),
        "num_fallback": {str(level): int((levels == level).sum()) for level in (1, 2, 3)},
        "listing_digest": listing_digest(paths),
    }
    atomic_write_text(meta_path, json.dumps(full_meta, indent=2, sort_keys=True))
    return folder


def is_store(folder: str | Path) -> bool:
    """True when `folder` holds a finished store."""
    return (Path(folder) / "meta.json").is_file()


class ProposalStore:
    """Read-only view of a finished store; arrays are memory-mapped, so opening costs almost nothing."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not self.folder.exists():
            raise ProposalStoreError(f"proposal store {self.folder} does not exist")
        if not meta_path.is_file():
            raise ProposalStoreError(
                f"{self.folder} is not a finished proposal store (no meta.json); "
                "run `soco proposals` again to finish it"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise ProposalStoreError(f"{meta_path}: corrupt ({error})") from None
        if self.meta.get("format") != STORE_FORMAT:
            raise ProposalStoreError(f"{self.folder}: not a soco proposal store")
        if self.meta.get("version") != STORE_VERSION:
            raise ProposalStoreError(
                f"{self.folder}: store format version {self.meta.get('version')}, "
                f"this soco reads version {STORE_VERSION}"
            )
        try:
            for name in _ARRAYS:
                setattr(self, f"_{name}", np.load(self.folder / f"{name}.npy", mmap_mode="r"))
        except (OSError, ValueError) as error:
            raise ProposalStoreError(f"{self.folder}: corrupt or incomplete store ({error})") from None
        if len(self._path_offsets) != self.meta["num_images"] + 1:
            raise ProposalStoreError(f"{self.folder}: arrays disagree with meta.json")

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
        while True:
            index = int(table[slot])
            if index == -1:
                raise KeyError(path)
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
        """{path: reason} for every image that could not be read."""
        return json.loads((self.folder / "failures.json").read_text())

    def valid_indices(self) -> np.ndarray:
        """Indices of images that were read successfully."""
        return np.flatnonzero(self._levels != FAILED_LEVEL)

    def record(self, index: int) -> ImageRecord:
        """The full record of one image."""
        path = self.path(index)
        width, height = (int(v) for v in self._sizes[index])
        level = int(self._levels[index])
        reason = self.failures().get(path, "") if level == FAILED_LEVEL else ""
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

        Every file's size is compared (a stat each); fingerprints for an evenly spread sample of
        `fingerprint_sample` images, or for all of them when it is None.
        """
        from soco.data.images import file_fingerprint, list_images

        images_root = Path(images_root)
        paths = list_images(images_root)
        if listing_digest(paths) != self.meta["listing_digest"]:
            ours = set(self.paths())
            extra = sorted(set(paths) - ours)[:3]
            missing = sorted(ours - set(paths))[:3]
            raise ProposalStoreError(
                f"proposal store {self.folder} was made for another image folder "
                f"({self.meta.get('images_root')}, {len(self)} images) than {images_root} "
                f"({len(paths)} images); not in the store: {extra or 'none'}; not in the folder: {missing or 'none'}"
            )
        sizes = self.byte_sizes
        for index, path in enumerate(paths):
            if (images_root / path).stat().st_size != sizes[index]:
                raise ProposalStoreError(
                    f"{images_root / path} changed since proposal store {self.folder} was made "
                    "(file size differs): recompute the proposals"
                )
        count = len(paths)
        sample = range(count) if fingerprint_sample is None or fingerprint_sample >= count else (
            np.linspace(0, count - 1, fingerprint_sample).astype(int)
        )
        for index in sample:
            data = (images_root / paths[index]).read_bytes()
            if file_fingerprint(data) != int(self.fingerprints[index]):
                raise ProposalStoreError(
                    f"{images_root / paths[index]} changed since proposal store {self.folder} was made "
                    "(content fingerprint differs): recompute the proposals"
                )

    def disk_bytes(self) -> int:
        """Bytes the store occupies on disk."""
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())
