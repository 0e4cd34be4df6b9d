"""Reading a `--weights` file for `soco transfer`: what it is, its tensors, and the widths and depth they imply."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from soco.errors import ConfigError, SocoError

__all__ = [
    "RESNET_PREFIXES",
    "check_depth",
    "check_weights_path",
    "detector_widths",
    "read_weights",
    "resnet_depth",
    "resnet_name",
]

SAFETENSORS_SUFFIX = ".safetensors"
RESNET_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
PRETRAIN_CHECKPOINT = Path("checkpoints") / "last.pt"
# What `soco export RUN --to torchvision|backbone` writes without -o (a C4 model exports only --to backbone).
EXPORTED_FILES = (Path("exported") / "torchvision.pt", Path("exported") / "backbone.pt")
TAKES = "soco transfer takes a torchvision state dict (.pt/.safetensors) written by `soco export --to torchvision`"

# Blocks per stage of torchvision's ResNets; BasicBlock (no conv3) for 18 and 34.
_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
           ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152}
_BLOCK_KEY = re.compile(r"^layer(?P<stage>[1-4])\.(?P<block>\d+)\.")
_HEAD_CONV_KEY = re.compile(r"^roi_heads\.box_head\.(?P<index>\d+)\.0\.weight$")
_HEAD_LINEAR_KEY = re.compile(r"^roi_heads\.box_head\.(?P<index>\d+)\.weight$")


def _export_hint(run: Path) -> str:
    """How to turn a pretraining run folder into a file that transfer reads."""
    for exported in (run / name for name in EXPORTED_FILES):
        if exported.is_file():
            return f"pass its export, --weights {exported}"
    return (f"run `soco export {run} --to torchvision` (`--to backbone` for a C4 model) first, then pass the "
            "file it writes")


def check_weights_path(path: str | Path) -> Path:
    """The path of a weights file, or a one-line SocoError saying what was given instead (missing, folder, .pkl)."""
    path = Path(path).expanduser()
    if path.is_dir():
        run = path.parent if path.name == PRETRAIN_CHECKPOINT.parent.name else path
        if (run / PRETRAIN_CHECKPOINT).is_file():
            raise SocoError(f"--weights {path} is a `soco pretrain` run folder, not a weights file: "
                            f"{_export_hint(run)}")
        raise SocoError(f"--weights {path} is a folder, not a weights file ({TAKES})")
    if not path.is_file():
        raise SocoError(f"weights file {path} does not exist (or pass --weights none)")
    if path.suffix == ".pkl":
        # Detectron2's format holds numpy arrays, which the weights-only unpickler refuses with a page of text.
        raise SocoError(f"weights file {path} is a Detectron2 .pkl (for Detectron2 itself); {TAKES}")
    return path


def _first_line(error: Exception) -> str:
    """The first line of an error's message (torch.load's run to a page)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _pretraining_run(path: Path) -> Path:
    """The run folder a pretraining checkpoint file sits in (runs/x for runs/x/checkpoints/last.pt)."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _what_else(path: Path, content: dict) -> str | None:
    """A one-line explanation when a torch file is a known soco or framework file other than exported weights."""
    keys = set(content)
    if "encoder_layout" in keys or "method_state" in keys or {"model", "predictor", "optimizer"} <= keys:
        run = _pretraining_run(path)
        hint = (_export_hint(run) if run / PRETRAIN_CHECKPOINT == path
                else f"run `soco export {path} --to torchvision` (`--to backbone` for a C4 model) first, then pass "
                     "the file it writes")
        return f"weights file {path} is a `soco pretrain` checkpoint, not exported weights: {hint}"
    if "model_type" in keys and "optimizer" in keys:
        return (f"weights file {path} is a `soco transfer` checkpoint (a fine-tuned detector): continue that run "
                "with --resume --out <its folder>; --weights takes pretrained weights")
    if "state_dict" in keys and "meta" in keys:
        return f"weights file {path} is an MMDetection checkpoint (from `soco export --to mmdet`); {TAKES}"
    return None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat torchvision-keyed {name: tensor} dict from a weights file; a one-line SocoError for anything else.

    Takes a `soco export --to torchvision` file (.pt or .safetensors), such a dict under 'model'/'state_dict',
    and a bare torchvision ResNet state dict (`--to backbone`), which becomes the detector's backbone.body.*.
    """
    path = check_weights_path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SocoError(f"weights file {path}: .safetensors files need the 'safetensors' package "
                            "(pip install safetensors)") from None
        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means the file is unusable
            raise SocoError(f"weights file {path} cannot be read as safetensors: {_first_line(exc)}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is unusable
            raise SocoError(f"weights file {path} cannot be read with torch.load(weights_only=True) "
                            f"({_first_line(exc)}); {TAKES}") from None
    if isinstance(state, dict):
        explanation = _what_else(path, state)
        if explanation:
            raise SocoError(explanation)
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SocoError(f"weights file {path} is not a state dict of tensors; {TAKES}")
    if all(k.startswith(RESNET_PREFIXES) for k in state):
        # A bare torchvision ResNet (`soco export --to backbone`, or resnet50().state_dict() without fc):
        # it is the detector's backbone.body.
        state = {f"backbone.body.{k}": v for k, v in state.items()}
    return state


def resnet_depth(state: dict[str, torch.Tensor]) -> int | None:
    """The torchvision ResNet depth whose blocks the file's backbone.body.* holds; None without a full trunk."""
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in state:
        name = resnet_name(key)
        match = _BLOCK_KEY.match(name) if name else None
        if match:
            blocks.setdefault(int(match["stage"]), set()).add(int(match["block"]))
            bottleneck = bottleneck or ".conv3." in name
    if sorted(blocks) != [1, 2, 3, 4]:
        return None
    counts = tuple(len(blocks[stage]) for stage in (1, 2, 3, 4))
    return _DEPTHS.get(("bottleneck" if bottleneck else "basic", counts))


def resnet_name(key: str) -> str | None:
    """A file key in torchvision resnet names (layer4 of a C4 head included), or None for other parts."""
    if key.startswith("backbone.body."):
        return key[len("backbone.body."):]
    if key.startswith("roi_heads.box_head.layer4."):
        return key[len("roi_heads.box_head."):]
    return None


def detector_widths(state: dict[str, torch.Tensor]) -> dict:
    """The FPN width and 4conv1fc head widths the file's tensors have, as build_detector keywords (only those present).

    A pretraining run may use other widths than torchvision's 256/256/1024 (soco_tiny: a 32-wide FPN, a 64-wide fc);
    the detector takes the file's, so that every tensor loads.
    """
    widths: dict = {}
    lateral = state.get("backbone.fpn.inner_blocks.0.0.weight")
    if lateral is not None and lateral.ndim == 4:
        widths["fpn_channels"] = int(lateral.shape[0])
    convs = {int(m["index"]): state[k] for k in state if (m := _HEAD_CONV_KEY.match(k)) and state[k].ndim == 4}
    linears = {int(m["index"]): state[k] for k in state if (m := _HEAD_LINEAR_KEY.match(k)) and state[k].ndim == 2}
    if linears:
        widths["box_head_convs"] = [int(convs[i].shape[0]) for i in sorted(convs)]
        widths["box_head_fcs"] = [int(linears[i].shape[0]) for i in sorted(linears)]
    return widths


def check_depth(state: dict[str, torch.Tensor], depth: int, path: str | Path) -> None:
    """ConfigError when the file's ResNet has another depth than the one configured."""
    found = resnet_depth(state)
    if found is not None and found != depth:
        raise ConfigError(f"weights file {path} holds a ResNet-{found}, but depth is {depth}: pass --depth {found}")
