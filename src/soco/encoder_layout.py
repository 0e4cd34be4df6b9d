"""What a method's detector-aligned encoder holds: the layout a checkpoint declares and export reads.

A method returns an `EncoderLayout` from `encoder_layout()`; the checkpoint stores it as the plain dict of
`to_dict()` (checkpoints load with torch.load(weights_only=True), which unpickles no class), and readers turn
the dict back with `EncoderLayout.from_dict`, which also reads the dicts older checkpoints hold. This module
imports no method, so export/ and transfer/ may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LAYOUT_KINDS = ("fpn", "c4", "c5")  # c5: a ResNet whose boxes (if any) are pooled on C5, without an FPN
ENCODER_PARTS = ("backbone", "fpn", "box_head", "res5")
BACKBONE_PREFIX = "backbone.body."


class LayoutError(ValueError):
    """A layout dict that does not say what an encoder holds; the message follows 'encoder_layout '."""


@dataclass(frozen=True)
class EncoderLayout:
    """The encoder's kind, the detector parts it holds, its ResNet depth, each part's key prefix, how it pooled.

    `prefixes` may name a part that is not exported (the projector's, so that export can leave it out by
    name); `pooler` records the pretraining RoI pooling ({"output_size", "strides", ...}) or is None.
    """

    kind: str
    parts: tuple[str, ...]
    depth: int | None
    prefixes: dict[str, str] = field(default_factory=dict)
    pooler: dict | None = None

    def to_dict(self) -> dict:
        """The plain dict a checkpoint stores (lists, not tuples, as the checkpoints before this class held)."""
        return {"kind": self.kind, "parts": list(self.parts), "depth": self.depth, "prefixes": dict(self.prefixes),
                "pooler": None if self.pooler is None else dict(self.pooler)}

    @classmethod
    def from_dict(cls, values: Any) -> EncoderLayout:
        """The layout of a checkpoint's dict; LayoutError naming the first entry that makes no sense."""
        if not isinstance(values, dict):
            raise LayoutError(f"must be a dict, not {type(values).__name__}")
        kind = values.get("kind")
        if kind not in LAYOUT_KINDS:
            raise LayoutError(f"kind {kind!r} is not one of {list(LAYOUT_KINDS)}")
        parts = values.get("parts")
        if not isinstance(parts, (list, tuple)) or not all(isinstance(part, str) for part in parts):
            raise LayoutError(f"parts must be a list of part names, got {parts!r}")
        unknown = [part for part in parts if part not in ENCODER_PARTS]
        if unknown:
            raise LayoutError(f"lists unknown part(s) {unknown}; export knows {list(ENCODER_PARTS)}")
        prefixes = values.get("prefixes") or {}
        if not isinstance(prefixes, dict) or not all(isinstance(p, str) and p for p in prefixes.values()):
            raise LayoutError("prefixes must map part names to key prefixes")
        depth = values.get("depth")
        pooler = values.get("pooler")
        return cls(kind=kind, parts=tuple(parts),
                   depth=depth if isinstance(depth, int) and not isinstance(depth, bool) else None,
                   prefixes={str(name): prefix for name, prefix in prefixes.items()},
                   pooler=dict(pooler) if isinstance(pooler, dict) else None)


def backbone_only_layout(depth: int, left_out_prefix: str, pooler: dict | None = None) -> EncoderLayout:
    """The layout of a method that pretrains a whole ResNet and nothing a detector takes besides.

    The trunk's keys read backbone.body.*; `left_out_prefix` names the heads that stay behind.
    """
    return EncoderLayout(kind="c5", parts=("backbone",), depth=depth,
                         prefixes={"backbone": BACKBONE_PREFIX, "projector": left_out_prefix}, pooler=pooler)
