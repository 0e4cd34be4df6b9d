"""Atomic writes shared by every command: a kill never leaves a torn file, or a half-built folder, under the final
name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, writer: Callable[[Path], None], sync: bool = True) -> Path:
    """Call `writer(tmp)` on a hidden temporary file beside `path`, sync it, then rename it to `path`.

    The temporary name keeps the final suffix, so writers that choose a format by suffix (matplotlib,
    safetensors, numpy) see the right one. A failed writer leaves no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        writer(tmp)
        if sync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a folder that refused the write may refuse the removal too: the writer's error is the one to tell
    return path


def torch_save(payload: object, path: str | Path) -> None:
    """torch.save to `path`, a refused or short write raised as the system's OSError (torch turns it into a
    RuntimeError whose text names an offset inside its zip writer)."""
    import torch  # here, so that commands which never save a tensor do not import torch

    try:
        # Through a Python file, so that the system's error, with its code, is what torch's RuntimeError interrupted.
        with open(path, "wb") as handle:
            torch.save(payload, handle)
    except RuntimeError as error:
        cause = error.__context__
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, cause.strerror) from error
        raise OSError(*_short_write(Path(path), error)) from error


def _short_write(path: Path, error: Exception) -> tuple[int, str]:
    """(errno, reason in words) of a write to `path` that torch reported without the system's error."""
    folder = next((parent for parent in path.parents if parent.is_dir()), path.parent)
    try:
        if shutil.disk_usage(folder).free == 0:
            return errno.ENOSPC, os.strerror(errno.ENOSPC)
    except OSError:
        pass  # a lost mount: told as a cut-short write below
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return errno.EIO, f"the write was cut short (a full disk or a lost mount?): {text}"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def finished_build(dest: Path, record_name: str, params: dict, outputs: Sequence[str]) -> bool:
    """True when dest holds a complete build of these parameters: its JSON record (with a "params" key) and every
    output file."""
    try:
        record = json.loads((dest / record_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("params") == params and all((dest / name).is_file() for name in outputs)


def refuse_foreign_folder(dest: Path, record_name: str) -> None:
    """DataError when dest is a non-empty folder without `record_name`: not an earlier build, so not ours to replace."""
    from soco.errors import DataError

    if dest.exists() and any(dest.iterdir()) and not (dest / record_name).exists():
        raise DataError(f"{dest} is not empty and holds no {record_name} of an earlier build: choose an empty "
                        "or new folder (it would be overwritten)")


@contextmanager
def folder_build(dest: Path) -> Iterator[Path]:
    """A fresh folder beside dest to build into; when the block ends it replaces dest whole, and when the block
    fails it is removed, leaving dest as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = dest.parent / f".{dest.name}.building"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    try:
        yield build
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(build, dest)  # a folder, which atomic_write (files only) cannot swap
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
