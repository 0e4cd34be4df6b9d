"""Tests of checkpoint saves: a refused or cut-short write is one CheckpointWriteError line naming the file, and the
file it would replace is kept byte for byte, with no temporary file left beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from soco.engine.checkpoint import CheckpointWriteError, save_checkpoint
from soco.errors import FileWriteError

# What torch 2.x says when its zip writer finds fewer bytes on disk than it wrote.
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def write_part_then_fail(payload, destination, *args, **kwargs):
    """A torch.save that writes the first bytes and then fails as torch does on a short write."""
    if isinstance(destination, (str, os.PathLike)):
        with open(destination, "wb") as handle:
            handle.write(b"PK\x03\x04")
    else:
        destination.write(b"PK\x03\x04")
        destination.flush()
    raise RuntimeError(TORCH_SHORT_WRITE)


@pytest.fixture
def saved(tmp_path):
    """(path, bytes) of a checkpoint written before the failing save."""
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"step": 1, "weight": torch.arange(6.0)}, path)
    return path, path.read_bytes()


def test_torch_saves_runtime_error_is_one_line_naming_the_file_and_keeps_the_old_one(saved, monkeypatch):
    path, before = saved
    monkeypatch.setattr(torch, "save", write_part_then_fail)
    expected = f"^cannot write checkpoint {path}: the write was cut short"
    with pytest.raises(CheckpointWriteError, match=expected) as error:
        save_checkpoint({"step": 2, "weight": torch.zeros(6)}, path)
    assert "\n" not in str(error.value) and isinstance(error.value, FileWriteError)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["last.pt"]  # the temporary file is gone


SHORT_WRITE = """
import resource, signal, sys, torch
from soco.engine.checkpoint import save_checkpoint
from soco.errors import SocoError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Python ignores it already: a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    save_checkpoint({"step": 2, "weight": torch.zeros(1 << 16)}, sys.argv[1])  # 256 KiB
except SocoError as error:
    sys.exit(f"error: {error}")
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and EFBIG as Linux has them")
def test_a_write_cut_short_by_the_file_size_limit_is_one_line_and_keeps_the_old_file(saved):
    path, before = saved
    done = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr == f"error: cannot write checkpoint {path}: File too large\n"
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["last.pt"]
