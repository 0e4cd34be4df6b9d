"""Content fingerprints of a fine-tuning run's input files, so that no resume or reuse mixes results of other data.

The annotation files and the weights are hashed whole (sha256): they are small next to an epoch's work, and an edit
that keeps a file's size (16 boxes cut to 4 can) must be seen. The images are fingerprinted by their sorted file
names, sizes and modification times (one `stat` each, no byte read): hashing every image of a large set would cost
about as much as decoding it once, i.e. an epoch of data loading, on every call and on every finished run a study
reads. A replaced or re-encoded image changes its mtime, so it is still seen.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from soco.errors import DataError
from soco.files import file_sha256

__all__ = ["input_fingerprint", "changed_input", "INPUT_NAMES"]

# In the order a refusal checks them, so that its line names the first file a user would look at.
INPUT_NAMES = ("train_annotations", "train_images", "val_annotations", "val_images", "weights")


def _image_list_digest(images_dir: Path, file_names: Iterable[str]) -> str:
    """sha256 of the sorted (name, size, mtime) of each listed image; a missing one is listed as missing."""
    digest = hashlib.sha256()
    for name in sorted(set(str(n) for n in file_names)):
        try:
            stat = (images_dir / name).stat()
            entry = [name, stat.st_size, stat.st_mtime_ns]
        except OSError:
            entry = [name, None, None]
        digest.update((json.dumps(entry) + "\n").encode("utf-8"))
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    """file_sha256, or DataError naming the file when it cannot be read."""
    try:
        return file_sha256(path)
    except OSError as error:
        raise DataError(f"{path}: cannot be read to fingerprint it ({error.strerror or error})") from error


def input_fingerprint(train_annotations: str | Path, train_images: str | Path, train_names: Iterable[str],
                      val_annotations: str | Path, val_images: str | Path, val_names: Iterable[str],
                      weights: str | Path | None) -> dict:
    """{name: {"path": resolved path, "sha256": digest}} of every input of a fine-tuning run (weights None: none)."""
    def entry(path: str | Path, digest) -> dict:
        resolved = Path(path).expanduser().resolve()
        return {"path": str(resolved), "sha256": digest(resolved)}

    fingerprint = {
        "train_annotations": entry(train_annotations, _file_digest),
        "train_images": entry(train_images, lambda folder: _image_list_digest(folder, train_names)),
        "val_annotations": entry(val_annotations, _file_digest),
        "val_images": entry(val_images, lambda folder: _image_list_digest(folder, val_names)),
        "weights": entry(weights, _file_digest) if weights is not None else None,
    }
    return fingerprint


def changed_input(recorded: dict, current: dict) -> str | None:
    """The first input whose content differs, in words ('the train annotations /x.json changed'), or None."""
    for name in INPUT_NAMES:
        before, now = recorded.get(name), current.get(name)
        if (before or {}).get("sha256") == (now or {}).get("sha256"):
            continue
        words = name.replace("_", " ")
        if now is None or before is None:
            return f"the {words} differ ({(before or {}).get('path', 'none')} -> {(now or {}).get('path', 'none')})"
        kind = "image list (names, sizes, dates)" if name.endswith("images") else "content"
        return f"the {words} {now['path']} changed ({kind} differs from the run's)"
    return None
