"""Atomic writes shared by every command: a kill never leaves a torn file, or a half-built folder, under the final
name; and the folder lock that keeps two soco processes from writing one folder at once."""

from __future__ import annotations

import contextlib
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


LOCK_NAME = ".lock"
# Errors of flock that mean the file system has no locks (some network mounts), not that the lock is held.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextmanager
def build_lock(dest: Path, command: str) -> Iterator[None]:
    """Hold dest's build lock (a lock file beside it) for a block, waiting while another process builds dest.

    Two processes preparing the same data set would otherwise share `folder_build`'s folder, the second removing
    the first's half-made build; the second should check again, once it holds the lock, whether the first
    finished the build it wants.
    """
    with folder_lock(Path(dest).parent, command, name=f"{LOCK_NAME}-{Path(dest).name}", wait=True):
        yield


def is_lock_file(path: Path) -> bool:
    """Whether a folder entry is one of `folder_lock`'s files (a folder holding only those is empty)."""
    return path.name == LOCK_NAME or path.name.startswith(f"{LOCK_NAME}-")


def _flock_module():
    """fcntl, or a SocoError saying that this system cannot lock folders."""
    try:
        import fcntl
    except ImportError:
        from soco.errors import SocoError

        raise SocoError("soco needs fcntl.flock (Linux or macOS) to keep two runs out of one folder; "
                        "this system has no fcntl") from None
    return fcntl


def _in_use_message(folder: Path, path: Path, holder: str, advice: str) -> str:
    """One line naming the folder, the process that holds it (as its lock file records it) and what to do."""
    pid, _, command = holder.strip().partition(" ")
    who = f"`{command}` run" if command else "soco process"
    return f"{folder} is in use by another {who} (pid {pid or 'unknown'}, lock {path}): {advice}"


def _is_same_file(handle, path: Path) -> bool:
    """Whether the open lock file is still the one at `path` (its holder removes it when it lets go)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _acquire(folder: Path, path: Path, command: str, wait: bool, error: type[Exception], advice: str):
    """The open lock file, flocked by this process and recording it; `error` when another process holds it."""
    fcntl = _flock_module()
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read()
            handle.close()
            raise error(_in_use_message(folder, path, holder, advice)) from None
        except OSError as failure:
            if failure.errno not in _NO_LOCKS:
                handle.close()
                raise
            break  # a file system without locks: run unguarded rather than not at all
        if _is_same_file(handle, path):
            break
        handle.close()  # locked a file its holder removed while this process waited: lock the new one
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {command}\n")
    handle.flush()
    return handle


@contextmanager
def folder_lock(folder: str | Path, command: str, name: str = LOCK_NAME, wait: bool = False,
                error: type[Exception] | None = None,
                advice: str = "wait for it to end, or stop it") -> Iterator[Path]:
    """Hold an exclusive flock on FOLDER/name for a block: one soco process at a time writes a folder.

    Another holder is refused with `error` (default SocoError) in one line naming the folder and the holder's pid
    and command, which the lock file records; with `wait`, block until it lets go instead. The kernel drops the
    lock when its process dies, so a killed run (even by SIGKILL) never blocks the next one. On release the lock
    file is removed, and the folder too when the lock made it and nothing else was written there.
    """
    from soco.errors import SocoError

    folder = Path(folder)
    path = folder / name
    made = not folder.exists()
    handle = _acquire(folder, path, command, wait, error or SocoError, advice)
    try:
        yield path
    finally:
        try:
            # Removed while still held: a process that opened it meanwhile sees it gone and locks a new file.
            path.unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # fails, as it should, when the block wrote anything
        finally:
            handle.close()
