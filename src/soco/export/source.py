"""Reading a pretraining checkpoint's encoder: the layout it declares (format 2) or the one its keys show (format 1)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from soco.encoder_layout import ENCODER_PARTS, LAYOUT_KINDS, EncoderLayout, LayoutError
from soco.errors import FileWriteError, SocoError

CHECKPOINT_NAME = "last.pt"
NETWORKS = ("online", "target")

# Format 2 (the redesigned engine): the encoder and what it holds are named by the checkpoint itself.
FORMAT_VERSION = 2
NETWORK_ENTRIES = {"online": "encoder", "target": "encoder_target"}
TRAINING_STATE_ENTRIES = ("method_state", "optimizer", "rng")
KINDS = LAYOUT_KINDS
PARTS = ENCODER_PARTS

# Format 1 (checkpoints written before the redesign): SoCo's ObjectEncoder, recognised by its key prefixes.
LEGACY_NETWORK_ENTRIES = {"online": "model", "target": "target"}
# What a format-1 checkpoint holds besides the encoders; none of it is a detector weight.
LEGACY_TRAINING_STATE_ENTRIES = ("predictor", "optimizer", "rng")

BODY_PREFIX = "backbone.body."
FPN_PREFIX = "backbone.fpn."
HEAD_PREFIX = "box_head."
PROJECTOR_PREFIX = "projector."
C4_HEAD_PREFIX = "box_head.layer4."  # the C4 variant's head is ResNet's layer4 (res5)
DEFAULT_PREFIXES = {"backbone": BODY_PREFIX, "fpn": FPN_PREFIX, "box_head": HEAD_PREFIX, "res5": C4_HEAD_PREFIX}

TensorDict = dict[str, torch.Tensor]

# The first bytes of what torch.save writes: a zip archive, or (the legacy form) a pickle of protocol 2 or later.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_MARK = 0x80
SNIFF_BYTES = 512


class ExportError(SocoError):
    """A checkpoint cannot be exported as asked."""


class ExportWriteError(ExportError, FileWriteError):
    """The export file could not be written; a file it would replace is intact."""


class CheckpointNotFoundError(ExportError):
    """The path is neither a run folder (with checkpoints/last.pt) nor a readable checkpoint file."""


class MissingModelError(ExportError):
    """The checkpoint has no encoder weights for the network asked for."""


class UnsupportedLayoutError(ExportError):
    """The format needs a part (the FPN, a 4conv1fc head) that this model does not have."""


class UnknownFormatError(ExportError):
    """The format name is not one of FORMAT_NAMES."""


@dataclass
class SourceWeights:
    """The encoder weights of one checkpoint, with what is known about the run that made them.

    `parts` lists what is exported; left as None (format 1), it is read from the keys.
    """

    path: Path
    network: str
    state: TensorDict
    layout: str  # one of KINDS
    config: dict | None = None
    step: int | None = None
    entries: tuple[str, ...] = ()  # the checkpoint's top-level keys
    parts: tuple[str, ...] | None = None
    prefixes: dict[str, str] | None = None
    depth: int | None = None
    method: str | None = None
    format_version: int = 1
    projector_prefix: str = PROJECTOR_PREFIX

    def __post_init__(self) -> None:
        """Fill in the format-1 defaults: the ObjectEncoder's prefixes and the parts its keys hold."""
        self.prefixes = {**DEFAULT_PREFIXES, **(self.prefixes or {})}
        if self.depth is None and self.format_version < FORMAT_VERSION:
            model = (self.config or {}).get("model")
            depth = model.get("depth") if isinstance(model, dict) else None
            self.depth = depth if isinstance(depth, int) else None
        if self.parts is None:
            held = self.keys_by_part()
            self.parts = tuple(part for part in PARTS if held.get(part) and part_fits(self.layout, part))

    def keys_by_part(self) -> dict[str | None, list[str]]:
        """Each key under the part whose prefix is its longest match; None for keys under no part's prefix."""
        by_length = sorted(self.prefixes.items(), key=lambda item: -len(item[1]))
        held: dict[str | None, list[str]] = {}
        for key in self.state:
            part = next((name for name, prefix in by_length if key.startswith(prefix)), None)
            held.setdefault(part, []).append(key)
        return held

    def part(self, name: str) -> OrderedDict[str, torch.Tensor]:
        """The tensors of one part with its prefix removed; empty when the part is not listed."""
        if name not in self.parts:
            return OrderedDict()
        prefix = self.prefixes[name]
        return OrderedDict((key[len(prefix):], self.state[key]) for key in self.keys_by_part().get(name, []))

    def body(self) -> OrderedDict[str, torch.Tensor]:
        """The ResNet trunk in torchvision resnet names (conv1, bn1, layer1..); layer4 of C4 comes from res5."""
        resnet = self.part("backbone")
        resnet.update(("layer4." + name, tensor) for name, tensor in self.part("res5").items())
        return resnet

    def fpn(self) -> OrderedDict[str, torch.Tensor]:
        """torchvision FeaturePyramidNetwork weights (inner_blocks.*, layer_blocks.*); empty without an FPN."""
        return self.part("fpn")

    def box_head(self) -> OrderedDict[str, torch.Tensor]:
        """The 4conv1fc head in torchvision FastRCNNConvFCHead names ("0.0.weight"...); empty for C4 or head-off."""
        return self.part("box_head")

    def projector(self) -> OrderedDict[str, torch.Tensor]:
        """The projector MLP, which no detector has."""
        prefix = self.projector_prefix
        return OrderedDict((k[len(prefix):], v) for k, v in self.state.items() if k.startswith(prefix))

    def unlisted(self) -> dict[str, int]:
        """Tensors that belong to no listed part, the projector aside, by key pattern: they are not exported."""
        counts: dict[str, int] = {}
        for part, keys in self.keys_by_part().items():
            if part is None:
                for key in keys:
                    if not key.startswith(self.projector_prefix):
                        pattern = key.split(".")[0] + ".* (not an encoder part)"
                        counts[pattern] = counts.get(pattern, 0) + 1
            elif part not in self.parts:
                counts[f"{self.prefixes[part]}* (not among the listed parts)"] = len(keys)
        return counts

    def absent_because(self, part: str) -> str:
        """Why the model lacks a part, in the terms of its checkpoint (its config, or its declared layout)."""
        if self.layout == "c4" and part in ("fpn", "box_head"):  # a C4 encoder has neither
            return "model.variant=c4" if self.format_version < FORMAT_VERSION else "encoder_layout kind 'c4'"
        if self.format_version < FORMAT_VERSION:
            return "model.fpn=false" if part == "fpn" else "model.head=false"
        if part == "fpn" and self.layout != "fpn":
            return f"encoder_layout kind '{self.layout}'"
        return f"no '{part}' among its encoder_layout parts"

    def training_entries(self) -> tuple[str, ...]:
        """The checkpoint's entries that hold training state or the other network: never exported."""
        if self.format_version < FORMAT_VERSION:
            candidates = (*LEGACY_TRAINING_STATE_ENTRIES, LEGACY_NETWORK_ENTRIES[_other(self.network)])
        else:
            candidates = (*TRAINING_STATE_ENTRIES, NETWORK_ENTRIES[_other(self.network)])
        return tuple(entry for entry in candidates if entry in self.entries)

    def description(self) -> str:
        """One line naming the checkpoint (and its method), its step, architecture and network."""
        arch = f"R{self.depth}-" if self.depth else ""
        step = f", step {self.step}" if self.step is not None else ""
        names = {"fpn": "FPN", "c4": "C4", "c5": "C5 (no FPN)"}
        name = names[self.layout] + (" without FPN weights" if self.layout == "fpn" and not self.fpn() else "")
        head = "" if self.layout == "c4" else (" 4conv1fc head" if self.box_head() else " no box head")
        method = f"{self.method} checkpoint " if self.method else ""
        return f"{method}{self.path}{step}: {arch}{name}{head}, {self.network} network"


def part_fits(kind: str, part: str) -> bool:
    """Whether a part can belong to a layout kind: res5 only to C4, the FPN only to FPN, the 4conv1fc head not to C4."""
    if part == "res5":
        return kind == "c4"
    if part == "fpn":
        return kind == "fpn"
    return part == "backbone" or kind != "c4"


def _other(network: str) -> str:
    """The network that is not `network`."""
    return "target" if network == "online" else "online"


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of a run folder (checkpoints/last.pt), of a checkpoints folder, or the file itself."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / CHECKPOINT_NAME, path / CHECKPOINT_NAME):
            if candidate.is_file():
                return candidate
        raise CheckpointNotFoundError(
            f"{path} is a folder without checkpoints/{CHECKPOINT_NAME}: not a `soco pretrain` run folder "
            "(give the run folder or a checkpoint file)")
    raise CheckpointNotFoundError(f"{path} does not exist: give a `soco pretrain` run folder or a checkpoint file")


def load_source(path: str | Path, network: str = "online") -> SourceWeights:
    """Read a run folder's or checkpoint file's encoder weights on the CPU with the weights-only unpickler."""
    if network not in NETWORKS:
        raise ExportError(f"network must be one of {list(NETWORKS)}, not {network!r}")
    checkpoint_path = resolve_checkpoint(path)
    checkpoint = read_checkpoint(checkpoint_path)
    version = checkpoint.get("format_version", 1)
    if "encoder_layout" in checkpoint or version != 1:
        return _declared_source(checkpoint_path, checkpoint, network)
    return _legacy_source(checkpoint_path, checkpoint, network)


def read_checkpoint(checkpoint_path: Path) -> dict:
    """The checkpoint's top-level dict, read with the weights-only unpickler; CheckpointNotFoundError otherwise."""
    not_a_checkpoint = _not_a_checkpoint(checkpoint_path)
    if not_a_checkpoint:
        raise CheckpointNotFoundError(f"{checkpoint_path} is not a readable PyTorch checkpoint: {not_a_checkpoint}")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is not a checkpoint
        # Some failures carry a bare detail (a KeyError's '101'), meaningless without the error's name.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointNotFoundError(f"{checkpoint_path} is not a readable PyTorch checkpoint "
                                      f"({type(error).__name__}{': ' + first_line if first_line else ''})") from None
    if not isinstance(checkpoint, dict):
        raise MissingModelError(f"{checkpoint_path} holds a {type(checkpoint).__name__}, not a soco checkpoint")
    return checkpoint


def _not_a_checkpoint(path: Path) -> str | None:
    """Why the file cannot be a checkpoint at all, told by its first bytes; None when it may be one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError:
        return None  # torch.load meets the same error and reports it
    if not head:
        return "the file is empty"
    if head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTOCOL_MARK:
        return None
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as error:
            # A multi-byte character cut by the read's end still makes a text file.
            text = head[:error.start].decode("utf-8") if error.start >= len(head) - 3 else None
        if text is not None:
            lines = text.strip().splitlines()
            return f"it is a text file (it begins {lines[0][:40]!r})" if lines else "it is a text file"
    return "it is neither a zip archive nor a pickle, the two forms torch.save writes"


def _tensors(state: dict) -> TensorDict:
    """The tensor entries of a state dict, in their order."""
    return OrderedDict((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))


def _common(checkpoint: dict) -> dict:
    """The SourceWeights fields read the same way from both formats."""
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    step = checkpoint.get("step")
    return dict(config=config, step=int(step) if isinstance(step, int) else None,
                entries=tuple(map(str, checkpoint)))


def _declared_source(checkpoint_path: Path, checkpoint: dict, network: str) -> SourceWeights:
    """SourceWeights of a format-2 checkpoint, whose encoder_layout says what the encoder holds."""
    version = checkpoint.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{checkpoint_path} has checkpoint format_version {version!r}; this soco exports "
                          f"format {FORMAT_VERSION} (and the older key-detected one): update soco to export it")
    method = checkpoint.get("method") if isinstance(checkpoint.get("method"), str) else None
    entry = NETWORK_ENTRIES[network]
    state = checkpoint.get(entry)
    if network == "target" and state is None:
        raise MissingModelError(
            f"{checkpoint_path} has no '{entry}' entry: the {method or 'pretraining'} method that wrote it has no "
            "target network; export the online one (--network online)")
    if not isinstance(state, dict) or not state:
        raise MissingModelError(f"{checkpoint_path} has no '{entry}' entry with encoder weights "
                                f"(it holds: {', '.join(map(str, list(checkpoint)[:8])) or 'nothing'})")
    layout = checkpoint.get("encoder_layout")
    if not isinstance(layout, dict):
        raise ExportError(f"{checkpoint_path} is a format-{FORMAT_VERSION} checkpoint without an "
                          "'encoder_layout' dict, so what its encoder holds is unknown: the file is damaged")
    try:
        declared = EncoderLayout.from_dict(layout)
    except LayoutError as error:
        raise ExportError(f"{checkpoint_path}: encoder_layout {error}") from None
    source = SourceWeights(
        path=checkpoint_path, network=network, state=_tensors(state), layout=declared.kind,
        parts=tuple(part for part in PARTS if part in declared.parts),
        prefixes={k: v for k, v in declared.prefixes.items() if k in PARTS}, depth=declared.depth,
        method=method, format_version=FORMAT_VERSION,
        projector_prefix=declared.prefixes.get("projector", PROJECTOR_PREFIX),
        **_common(checkpoint),
    )
    _check_declared_parts(source, entry)
    return source


def _check_declared_parts(source: SourceWeights, entry: str) -> None:
    """ExportError unless the listed parts fit the layout's kind, are distinctly prefixed and all hold weights."""
    where = f"{source.path}: encoder_layout"
    if "backbone" not in source.parts:
        raise ExportError(f"{where} lists no 'backbone' part, and every export format needs the ResNet trunk")
    if len(set(source.prefixes.values())) != len(source.prefixes):
        raise ExportError(f"{where} gives two parts the same key prefix: {source.prefixes}")
    misplaced = [part for part in source.parts if not part_fits(source.layout, part)]
    if misplaced:
        raise ExportError(f"{where} kind '{source.layout}' cannot hold the part(s) {misplaced} "
                          "(res5 is the C4 head; C4 has no FPN and no 4conv1fc head): the file is inconsistent")
    held = source.keys_by_part()
    for part in source.parts:
        if not held.get(part):
            raise ExportError(f"{where} lists the '{part}' part, but its '{entry}' holds no "
                              f"{source.prefixes[part]}* weights")


def _legacy_source(checkpoint_path: Path, checkpoint: dict, network: str) -> SourceWeights:
    """SourceWeights of a format-1 checkpoint (before the redesign), its layout told by its key prefixes."""
    entry = LEGACY_NETWORK_ENTRIES[network]
    state = checkpoint.get(entry)
    if not isinstance(state, dict) or not state:
        entries = ", ".join(map(str, list(checkpoint)[:8])) or "nothing"
        raise MissingModelError(
            f"{checkpoint_path} has no '{entry}' entry with encoder weights (it holds: {entries}); "
            "export needs a checkpoint written by `soco pretrain`")
    tensors = _tensors(state)
    if not any(k.startswith(BODY_PREFIX) for k in tensors):
        raise MissingModelError(
            f"{checkpoint_path}: '{entry}' holds no backbone.body.* weights, so it is not a soco ObjectEncoder "
            f"(first keys: {', '.join(list(tensors)[:3]) or 'none'})")
    common = _common(checkpoint)
    return SourceWeights(path=checkpoint_path, network=network, state=tensors,
                         layout=detect_layout(tensors, common["config"]), **common)


def detect_layout(state: TensorDict, config: dict | None = None) -> str:
    """'fpn', 'c4' or 'c5' (variant fpn with model.fpn=false: boxes pooled on C5) from a format-1 encoder's keys."""
    if any(k.startswith(FPN_PREFIX) for k in state):
        layout = "fpn"
    elif any(k.startswith(C4_HEAD_PREFIX) for k in state):
        layout = "c4"
    elif any(k.startswith(BODY_PREFIX + "layer4.") for k in state):
        layout = "c5"
    else:  # a C4 trunk whose res5 head was turned off (model.head=false)
        layout = "c4"
    variant = ((config or {}).get("model") or {}).get("variant") if isinstance(config, dict) else None
    if variant in ("fpn", "c4") and (variant == "c4") != (layout == "c4"):
        raise ExportError(f"the checkpoint's configuration says model.variant={variant} but its weights are "
                          f"laid out as {layout}: the file is inconsistent")
    return layout
