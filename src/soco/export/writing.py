"""Writing exported weights: the provenance header every format carries, and atomic state-dict and torch files."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from soco.export.source import ExportError, SourceWeights
from soco.files import atomic_write, torch_save

PRODUCER = "soco"
SAFETENSORS_SUFFIX = ".safetensors"


def provenance(source: SourceWeights, format_name: str | None = None) -> dict[str, str]:
    """Who wrote the file and from which checkpoint and network; plain strings, as safetensors metadata must be."""
    header = {"format": format_name} if format_name else {}
    header.update(producer=PRODUCER, source=str(source.path), network=source.network)
    return header


def plain_tensors(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies, so a file never holds a view's whole storage or autograd state."""
    return {name: tensor.detach().contiguous().clone() for name, tensor in weights.items()}


def save_torch(payload: object, path: Path) -> None:
    """torch.save `payload` to `path` atomically; OSError when the system refuses the write or cuts it short."""
    atomic_write(path, lambda tmp: torch_save(payload, tmp))


def save_state_dict(weights: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """torch.save of a plain dict of tensors, or a safetensors file when the name ends in .safetensors.

    OSError when the system refuses the write or cuts it short.
    """
    plain = plain_tensors(weights)
    if path.suffix == SAFETENSORS_SUFFIX:
        atomic_write(path, lambda tmp: _save_safetensors(plain, tmp, metadata))
    else:
        save_torch(plain, path)


def _save_safetensors(plain: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    """safetensors' save_file, the system's refusal raised as an OSError, as every other writer raises it."""
    save_file = _safetensors().save_file
    from safetensors import SafetensorError

    try:
        save_file(plain, str(path), metadata=metadata)
    except SafetensorError as error:
        # Its text carries the system's error code: "... I/O error: File too large (os error 27)".
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from error


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by save_state_dict (torch.load weights-only, or safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _safetensors().load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} is not a plain dict of tensors (a `soco export --to torchvision` file)")
    return state


def _safetensors():
    """The safetensors.torch module, or a clear error when the optional package is missing."""
    try:
        import safetensors.torch
    except ImportError:
        raise ExportError(".safetensors files need the 'safetensors' package (pip install safetensors); "
                          "or use a .pt file name") from None
    return safetensors.torch
