"""The pretraining data set: images of a folder (with their stored proposals) through a method's sample transform.

The data set knows no method. A method hands in its transform: a picklable object with
`__call__(image, proposals, generator, source) -> sample` and `collate(samples) -> batch`, and a
`needs_proposals` flag. `image` is the decoded HxWx3 uint8 RGB array, `proposals` the image's (N, 4)
boxes in original pixels (empty without a store), `generator` a torch.Generator seeded from (seed,
epoch, image index), and `source` a `SampleSource` that reads other images of the data set with that
generator (InsLoc pastes crops onto two other images).

Because every sample draws only from its own generator, what an image becomes in an epoch does not
depend on the order, the batch or the number of data-loader workers. An image that cannot be read is
not fatal: it is replaced by the next readable one and counted; `collate` reports it in the batch
(workers are separate processes, so the batch is how the count reaches the training loop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from soco.data.image_files import list_images, load_rgb
from soco.data.proposals.store import ProposalStore
from soco.errors import DataError, ImageReadError

__all__ = [
    "SampleTransform",
    "SampleSource",
    "SkippedSample",
    "ImageDataset",
    "BatchCollate",
    "sample_seed",
    "MAX_REPLACEMENTS",
    "RESERVED_BATCH_KEYS",
]

_log = logging.getLogger(__name__)
_UINT64 = 2**64
MAX_REPLACEMENTS = 8
# Keys the data set adds to every batch; a method's collate must not use them.
RESERVED_BATCH_KEYS = ("indices", "paths", "skipped", "skipped_paths")


class SampleTransform(Protocol):
    """What a method gives the data set: how one image becomes a sample, and how samples become a batch."""

    needs_proposals: bool

    def __call__(self, image: np.ndarray, proposals: np.ndarray, generator: torch.Generator,
                 source: SampleSource) -> dict:
        """The sample of one image."""

    def collate(self, samples: list[dict]) -> dict:
        """A batch of samples."""


@dataclass(frozen=True)
class SkippedSample:
    """The marker the data set returns for an image it could not use, and why."""

    index: int  # index in the proposal store (or in the folder listing)
    path: str  # relative to the image folder
    reason: str


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one image in one epoch, well mixed so that nearby triples are unrelated."""
    entropy = [int(seed) % _UINT64, int(epoch) % _UINT64, int(index) % _UINT64]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class SampleSource:
    """Read access to other images of the data set for a transform, drawn with the sample's generator."""

    def __init__(self, dataset: ImageDataset):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def draw(self, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """(image, proposals, store index) of a uniformly drawn readable image; unreadable ones are redrawn."""
        for _ in range(MAX_REPLACEMENTS + 1):
            position = int(torch.randint(0, len(self._dataset), (1,), generator=generator)[0])
            loaded = self._dataset.read(position)
            if not isinstance(loaded, SkippedSample):
                return loaded
        raise DataError(f"{MAX_REPLACEMENTS + 1} images drawn in a row from {self._dataset.images_root} "
                        "are unreadable")


class ImageDataset(Dataset):
    """Every readable image of a folder (those of its proposal store, when the method needs proposals)."""

    def __init__(
        self,
        images_root: str | Path,
        store: ProposalStore | str | Path | None,
        transform: SampleTransform,
        seed: int = 0,
        check_images: bool = True,
    ):
        self.images_root = Path(images_root)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        if store is None:
            if getattr(transform, "needs_proposals", False):
                raise DataError("this method needs object proposals: give a proposal store")
            self._store = None
            self._store_folder = None
            self._paths = list_images(self.images_root)
            if not self._paths:
                raise DataError(f"image folder {self.images_root} holds no image")
            self.indices = np.arange(len(self._paths), dtype=np.int64)
        else:
            self._store = store if isinstance(store, ProposalStore) else ProposalStore(store)
            self._store_folder = self._store.folder
            self._paths = None
            if check_images:
                self._store.check_images(self.images_root)
            self.indices = np.asarray(self._store.valid_indices(), dtype=np.int64)
        self.skipped = 0
        self.skipped_paths: dict[str, str] = {}

    @property
    def store(self) -> ProposalStore | None:
        """The proposal store (re-opened after the data set was sent to a spawned worker), or None."""
        if self._store is None and self._store_folder is not None:
            self._store = ProposalStore(self._store_folder)
        return self._store

    def __getstate__(self) -> dict:
        # Memory maps would be pickled as full copies; a worker re-opens the store in milliseconds.
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations `__getitem__` draws for plain integer keys."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def collate(self) -> BatchCollate:
        """The collate function for a DataLoader over this data set (picklable for workers)."""
        return BatchCollate(self.transform)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | SkippedSample:
        """The sample of the image at `position`; an unreadable image is replaced by the next readable one.

        `key` is a position (augmented for the epoch chosen by set_epoch) or an (epoch, position) pair,
        which lets one long-lived loader cross epochs without restarting its workers. Replacing keeps
        every batch full, so processes training together never disagree on whether a batch exists;
        the unreadable images travel with the sample ("replaced") to be counted. A SkippedSample comes
        back only if MAX_REPLACEMENTS + 1 images in a row are unreadable.
        """
        epoch, position = key if isinstance(key, tuple) else (self.epoch, key)
        unreadable = []
        for offset in range(MAX_REPLACEMENTS + 1):
            sample = self._load(epoch, (position + offset) % len(self.indices))
            if isinstance(sample, dict):
                sample["replaced"] = unreadable
                return sample
            unreadable.append(sample)
        return unreadable[0]

    def check_readable(self) -> None:
        """DataError naming the folder unless some image can be read; reads in order up to the first that can.

        Replacing unreadable images keeps batches full only while one readable image exists: without one, every
        batch would be empty and a run would train on nothing. Stopping at the first readable image costs one
        decode on a healthy folder, where probing every file would take minutes on ImageNet.
        """
        if len(self.indices) == 0:  # only with a store: every image failed when its proposals were computed
            raise DataError(f"no image in {self.images_root} can be read: the proposal store {self._store_folder} "
                            f"has proposals for none of its {len(self.store)} files (see {self.store.failures_file})")
        first = None
        for position in range(len(self.indices)):
            loaded = self.read(position)
            if not isinstance(loaded, SkippedSample):
                return
            first = first or loaded
        raise DataError(f"no image in {self.images_root} can be read: all {len(self.indices)} files tried are "
                        f"unreadable (e.g. {first.path}: {first.reason})")

    def relative_path(self, index: int) -> str:
        """The path, relative to the image folder, of store (or listing) index `index`."""
        return self._paths[index] if self._paths is not None else self.store.path(index)

    def read(self, position: int) -> tuple[np.ndarray, np.ndarray, int] | SkippedSample:
        """(RGB image, proposals, index) of the image at `position`, or a SkippedSample saying why not."""
        index = int(self.indices[position])
        relative = self.relative_path(index)
        path = self.images_root / relative
        try:
            rgb = load_rgb(path)  # decode_rgb of the file's bytes, with clear reasons for unreadable files
        except ImageReadError as error:
            return SkippedSample(index, relative, error.reason)
        except OSError as error:
            return SkippedSample(index, relative, f"cannot read file ({error.strerror or error})")
        store = self.store
        if store is None:
            return rgb, np.zeros((0, 4), dtype=np.float32), index
        width, height = (int(v) for v in store.sizes[index])
        if rgb.shape[:2] != (height, width):
            # Boxes of another picture would teach the wrong objects; the file changed after the store.
            return SkippedSample(
                index, relative, f"image is {rgb.shape[1]}x{rgb.shape[0]}, the proposal store says {width}x{height}"
            )
        boxes = store.boxes(index)
        if not np.isfinite(boxes).all():
            # A store written by soco holds finite boxes only: these were damaged after it was made.
            return SkippedSample(index, relative, f"its boxes in the proposal store {store.folder} are not finite "
                                                  "numbers (the store is damaged: compute it again with soco proposals)")
        return rgb, boxes, index

    def _load(self, epoch: int, position: int) -> dict | SkippedSample:
        """The transformed sample of one image, or a SkippedSample saying why it cannot be used."""
        loaded = self.read(position)
        if isinstance(loaded, SkippedSample):
            return loaded
        rgb, proposals, index = loaded
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        data = self.transform(rgb, proposals, generator, SampleSource(self))
        return {"data": data, "index": index, "path": self.relative_path(index)}

    def count_skipped(self, batch: dict) -> dict:
        """Add a collated batch's skipped images to `skipped` (call in the training process); returns the batch."""
        self.skipped += int(batch["skipped"])
        for path, reason in batch["skipped_paths"].items():
            if path not in self.skipped_paths:
                _log.warning("skipping unreadable image %s: %s", path, reason)
            self.skipped_paths[path] = reason
        return batch


class BatchCollate:
    """Collate for a DataLoader: the method's batch of the kept samples, plus indices, paths and skips.

    Returns the method's batch (its own keys) with "indices" (B,), "paths", "skipped" (count of
    unreadable images met) and "skipped_paths" {path: reason}. When every sample was skipped, B is 0
    and the method's keys are absent.
    """

    def __init__(self, transform: SampleTransform):
        self.transform = transform

    def __call__(self, samples: list[dict | SkippedSample | None]) -> dict[str, Any]:
        kept = [s for s in samples if isinstance(s, dict)]
        dropped = [s for s in samples if not isinstance(s, dict)]
        dropped += [replaced for s in kept for replaced in s.get("replaced", [])]
        batch: dict[str, Any] = self.transform.collate([s["data"] for s in kept]) if kept else {}
        clash = [key for key in RESERVED_BATCH_KEYS if key in batch]
        if clash:
            raise ValueError(f"a method's batch may not use the data set's keys {clash}")
        batch.update({
            "indices": torch.tensor([s["index"] for s in kept], dtype=torch.int64),
            "paths": [s["path"] for s in kept],
            "skipped": len(dropped),
            "skipped_paths": {s.path: s.reason for s in dropped if isinstance(s, SkippedSample)},
        })
        return batch


def batch_size_of(batch: dict) -> int:
    """Images in a collated batch."""
    return len(batch["paths"])
