"""The pretraining dataset: images of a folder with their stored proposals, turned into SoCo's views.

Each sample's augmentation comes from its own torch.Generator seeded from (seed, epoch, image index),
so what an image becomes in an epoch does not depend on the order, the batch or the number of
data-loader workers. An image that cannot be read during training is not fatal: `__getitem__` returns
a `SkippedSample`, `collate_views` drops it and reports it in the batch (workers are separate
processes, so the batch is how the count reaches the training loop), and
`SoCoDataset.count_skipped(batch)` adds it to the dataset's tally in the parent process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from soco.config.schema import ViewsConfig
from soco.data.images import load_rgb
from soco.data.proposals.store import ProposalStore
from soco.data.views import check_views_config, denormalize, make_views
from soco.errors import ImageReadError

__all__ = ["SkippedSample", "SoCoDataset", "sample_seed", "collate_views", "draw_batch_views"]

_log = logging.getLogger(__name__)
_UINT64 = 2**64


@dataclass(frozen=True)
class SkippedSample:
    """The marker `SoCoDataset` returns for an image it could not use, and why."""

    index: int  # index in the proposal store
    path: str  # relative to the image folder
    reason: str


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one image in one epoch, well mixed so that nearby triples are unrelated."""
    entropy = [int(seed) % _UINT64, int(epoch) % _UINT64, int(index) % _UINT64]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class SoCoDataset(Dataset):
    """Every readable image of a proposal store, as a dict of SoCo views with their boxes."""

    def __init__(
        self,
        images_root: str | Path,
        store: ProposalStore | str | Path,
        views_config: ViewsConfig,
        seed: int = 0,
        check_images: bool = True,
    ):
        self.images_root = Path(images_root)
        self._store = store if isinstance(store, ProposalStore) else ProposalStore(store)
        self._store_folder = self._store.folder
        check_views_config(views_config)
        self.views_config = views_config
        self.seed = int(seed)
        self.epoch = 0
        if check_images:
            self._store.check_images(self.images_root)
        self.indices = np.asarray(self._store.valid_indices(), dtype=np.int64)
        self.skipped = 0
        self.skipped_paths: dict[str, str] = {}

    @property
    def store(self) -> ProposalStore:
        """The proposal store (re-opened after the dataset was sent to a spawned worker)."""
        if self._store is None:
            self._store = ProposalStore(self._store_folder)
        return self._store

    def __getstate__(self) -> dict:
        # Memory maps would be pickled as full copies; a worker re-opens the store in milliseconds.
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations `__getitem__` draws.

        Call it before creating the DataLoader iterator: workers copy the dataset when an iterator
        starts, so persistent workers keep the epoch they started with.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | SkippedSample:
        """The views of image `position`; an unreadable image is replaced by the next readable one.

        `key` is a position (augmented for the epoch chosen by set_epoch) or an (epoch, position) pair,
        which lets one long-lived loader cross epochs without restarting its workers. Replacing keeps
        every batch full, so processes training together never disagree on whether a batch exists;
        the unreadable images travel with the sample ("replaced") to be counted. A SkippedSample comes
        back only if MAX_REPLACEMENTS images in a row are unreadable.
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

    def _load(self, epoch: int, position: int) -> dict | SkippedSample:
        """The views of one image, or a SkippedSample saying why it cannot be used."""
        store = self.store
        index = int(self.indices[position])
        relative = store.path(index)
        path = self.images_root / relative
        try:
            rgb = load_rgb(path)  # decode_rgb of the file's bytes, with clear reasons for unreadable files
        except ImageReadError as error:
            return SkippedSample(index, relative, error.reason)
        except OSError as error:
            return SkippedSample(index, relative, f"cannot read file ({error.strerror or error})")
        width, height = (int(v) for v in store.sizes[index])
        if rgb.shape[:2] != (height, width):
            # Boxes of another picture would teach the wrong objects; the file changed after the store.
            return SkippedSample(
                index, relative, f"image is {rgb.shape[1]}x{rgb.shape[0]}, the proposal store says {width}x{height}"
            )
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        out = make_views(rgb, store.boxes(index), self.views_config, generator)
        return {
            "views": out["views"],
            "boxes": out["boxes"],
            "view_names": out["view_names"],
            "proposal_ids": out["proposal_ids"],
            "index": index,
            "path": relative,
        }

    def count_skipped(self, batch: dict) -> dict:
        """Add a collated batch's skipped images to `skipped` (call in the training process); returns the batch."""
        self.skipped += int(batch["skipped"])
        for path, reason in batch["skipped_paths"].items():
            if path not in self.skipped_paths:
                _log.warning("skipping unreadable image %s: %s", path, reason)
            self.skipped_paths[path] = reason
        return batch


MAX_REPLACEMENTS = 8


def collate_views(samples: list[dict | SkippedSample | None]) -> dict:
    """Stack samples into a batch, dropping skipped ones and counting them.

    Returns {"views": [(B, 3, S, S) per view], "boxes": [(B, K, 4) per view], "view_names",
    "proposal_ids": (B, K), "indices": (B,), "paths", "skipped": int, "skipped_paths": {path: reason}}.
    When every sample was skipped, B is 0 and "views" and "boxes" are empty lists.
    """
    kept = [s for s in samples if isinstance(s, dict)]
    dropped = [s for s in samples if not isinstance(s, dict)]
    dropped += [replaced for s in kept for replaced in s.get("replaced", [])]
    names = kept[0]["view_names"] if kept else []
    return {
        "views": [torch.stack([s["views"][v] for s in kept]) for v in range(len(names))],
        "boxes": [torch.stack([s["boxes"][v] for s in kept]) for v in range(len(names))],
        "view_names": list(names),
        "proposal_ids": (
            torch.stack([s["proposal_ids"] for s in kept]) if kept else torch.zeros((0, 0), dtype=torch.int64)
        ),
        "indices": torch.tensor([s["index"] for s in kept], dtype=torch.int64),
        "paths": [s["path"] for s in kept],
        "skipped": len(dropped),
        "skipped_paths": {s.path: s.reason for s in dropped if isinstance(s, SkippedSample)},
    }


def draw_batch_views(batch: dict, path: str | Path, max_images: int = 4) -> Path:
    """Save a PNG grid of a collated batch: a row per image, a column per view, box k in colour k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not batch["views"] or len(batch["views"][0]) == 0:
        raise ValueError("the batch holds no image to draw (every sample was skipped)")
    rows = min(len(batch["views"][0]), max_images)
    columns = len(batch["views"])
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), dpi=100, squeeze=False)
    colours = plt.get_cmap("tab10")
    for row in range(rows):
        for column in range(columns):
            view = batch["views"][column][row]
            side_h, side_w = view.shape[-2:]
            ax = axes[row][column]
            # extent puts pixel i on [i, i+1], the convention of the boxes' coordinates
            ax.imshow(denormalize(view).permute(1, 2, 0).numpy(), extent=(0, side_w, side_h, 0))
            for number, (x1, y1, x2, y2) in enumerate(batch["boxes"][column][row].tolist()):
                ax.add_patch(
                    Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.8, edgecolor=colours(number % 10))
                )
            ax.set_xlim(0, side_w)
            ax.set_ylim(side_h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{batch['view_names'][column]} ({side_w}x{side_h})", fontsize=9)
            if column == 0 and batch.get("paths"):
                ax.set_ylabel(Path(batch["paths"][row]).name, fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
