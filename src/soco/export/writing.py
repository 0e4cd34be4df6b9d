"""Writing exported weights: the provenance header every format carries, and atomic state-dict and torch files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from soco.export.source import ExportError, SourceWeights
from soco.files import atomic_write

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
    """torch.save `payload` to `path` atomically."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def save_state_dict(weights: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """torch.save of a plain dict of tensors, or a safetensors file when the name ends in .safetensors."""
    plain = plain_tensors(weights)
    if path.suffix == SAFETENSORS_SUFFIX:
        save_file = _safetensors().save_file
        atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=metadata))
    else:
        save_torch(plain, path)


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
