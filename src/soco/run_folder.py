"""Run folders of `soco pretrain` and `soco transfer`: whose folder `--out` is, and what a run was made with.

A run holds the folder's lock (`.lock`, `files.folder_lock`) while it runs, and writes `soco-run.json`
({"kind": ..., "soco_version": ...}) into its folder before anything else,
so that a later command recognises its own folder the way `soco proposals` recognises its store by
`meta.json`. A non-empty folder without that file (an image folder, someone's documents) is refused,
unless it holds the files a run of the same kind wrote before the marker existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import soco
from soco.errors import SocoError
from soco.files import atomic_write_text, is_lock_file

MARKER = "soco-run.json"

# Files that only a run of that kind writes: folders made by soco versions without the marker.
# A pretraining run writes config.yaml and train.log before its first step.
OLDER_RUN_SIGNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pretrain": (("checkpoints/last.pt",), ("config.yaml", "train.log")),
    "transfer": (("checkpoint.pt",), ("metrics.json",)),
}


def _is_marker_in_progress(entry: Path) -> bool:
    """A temporary file of another process writing the marker (atomic_write's name for it)."""
    return entry.name.startswith(f".{Path(MARKER).stem}.") and ".tmp" in entry.name


def _is_starting_run(entry: Path) -> bool:
    """What a run that is starting puts into a folder before its marker: its lock, the marker's temporary file."""
    return is_lock_file(entry) or _is_marker_in_progress(entry)


def run_kind(folder: str | Path) -> str | None:
    """The kind of soco run a folder holds ("pretrain", "transfer"), or None for none."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text())["kind"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise SocoError(f"{marker} is not a soco run marker ({error}): choose another --out") from None
    for kind, signs in OLDER_RUN_SIGNS.items():
        if any(all((folder / name).is_file() for name in sign) for sign in signs):
            return kind
    return None


def check_run_folder(folder: str | Path, kind: str) -> bool:
    """Whether `folder` already holds a `kind` run (False: absent or empty); SocoError for anything else.

    Refused: a file, a run of another kind, a non-empty folder that is not a soco run. Writes nothing.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SocoError(f"--out {folder} is a file, not a folder: choose a new or empty folder for the run")
    if not folder.exists() or not any(not _is_starting_run(entry) for entry in folder.iterdir()):
        return False
    found = run_kind(folder)
    if found == kind:
        return True
    if found is not None:
        raise SocoError(f"--out {folder} holds a soco {found} run, not a {kind} run: choose another folder")
    raise SocoError(f"--out {folder} is not empty and is not a soco {kind} run (no {MARKER}): "
                    "choose a new or empty folder for the run")


def mark_run_folder(folder: str | Path, kind: str) -> Path:
    """Create the folder and write its marker (once; every process of a distributed run may call this)."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"kind": kind, "soco_version": soco.__version__}) + "\n")
    return folder


def claim_run_folder(folder: str | Path, kind: str) -> bool:
    """Check the folder (see `check_run_folder`), then mark it as a `kind` run; returns whether it held one."""
    held = check_run_folder(folder, kind)
    mark_run_folder(folder, kind)
    return held


def flatten_settings(settings: dict, prefix: str = "") -> dict:
    """A nested settings dict as {"section.key": value} (lists stay values)."""
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_settings(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_settings(recorded: dict, current: dict, may_change: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """(key, recorded value, current value) for each setting that differs, in the current order.

    Both are nested dicts. Keys in `may_change` (or under a section named there) are ignored, and so are
    keys one side lacks (a key that a newer or older soco added or removed).
    """
    old, new = flatten_settings(recorded), flatten_settings(current)
    ignored = tuple(may_change)
    return [
        (key, old[key], value) for key, value in new.items()
        if key in old and old[key] != value and not any(key == i or key.startswith(f"{i}.") for i in ignored)
    ]


def describe_changes(changes: list[tuple[str, object, object]]) -> str:
    """'key old -> new, ...' on one line."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
