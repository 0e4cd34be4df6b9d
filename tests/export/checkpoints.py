"""Pretraining checkpoints for the export tests, in both formats, built without soco's own model code.

The encoder is assembled from the torchvision modules SoCo's ObjectEncoder is made of, under the same names,
so these tests do not move with the model code; test_builder_matches_the_layout1_fixture ties the two
together through the fixture the old code wrote.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUT1_FIXTURE = FIXTURES / "soco_tiny_layout1_last.pt"
LAYOUT1_EXPORTS = FIXTURES / "soco_tiny_layout1_exports.json"

# The model section of a format-1 checkpoint's config, as the old ModelConfig defaulted it (the keys export reads
# and those that shape the encoder).
LEGACY_MODEL_DEFAULTS = {
    "variant": "fpn", "depth": 50, "fpn": True, "head": True, "fpn_channels": 256, "head_convs": 4,
    "head_fc_dim": 1024, "projector_hidden": 4096, "projection_dim": 256,
}
PREFIXES = {"backbone": "backbone.body.", "fpn": "backbone.fpn.", "box_head": "box_head.", "res5": "box_head.layer4.",
            "projector": "projector."}
HEAD_CONV_CHANNELS = 256


def _stage_channels(layer: nn.Sequential) -> int:
    """Output channels of a ResNet stage."""
    block = layer[-1]
    return (block.bn3 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.bn2).num_features


def build_encoder(**model) -> nn.Module:
    """A module whose state dict has the ObjectEncoder's keys and shapes for the format-1 model settings given."""
    settings = {**LEGACY_MODEL_DEFAULTS, **model}
    network = getattr(torchvision.models, f"resnet{settings['depth']}")(weights=None)
    encoder = nn.Module()
    if settings["variant"] == "fpn" and settings["fpn"]:
        encoder.backbone = BackboneWithFPN(
            network, return_layers={f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
            in_channels_list=[_stage_channels(getattr(network, f"layer{k}")) for k in (1, 2, 3, 4)],
            out_channels=settings["fpn_channels"], extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
        pooled_channels = settings["fpn_channels"]
    else:
        last = "layer4" if settings["variant"] == "fpn" else "layer3"
        encoder.backbone = nn.Module()
        encoder.backbone.body = IntermediateLayerGetter(network, return_layers={last: "0"})
        pooled_channels = _stage_channels(getattr(network, last))
    if not settings["head"]:
        representation = pooled_channels  # global average pooling, no weights
    elif settings["variant"] == "c4":
        encoder.box_head = nn.Module()
        encoder.box_head.layer4 = network.layer4
        representation = _stage_channels(network.layer4)
    else:
        encoder.box_head = FastRCNNConvFCHead((pooled_channels, 7, 7), [HEAD_CONV_CHANNELS] * settings["head_convs"],
                                              [settings["head_fc_dim"]], norm_layer=nn.BatchNorm2d)
        representation = settings["head_fc_dim"]
    hidden = settings["projector_hidden"]
    encoder.projector = nn.Sequential(OrderedDict(
        linear1=nn.Linear(representation, hidden), norm=nn.BatchNorm1d(hidden), relu=nn.ReLU(),
        linear2=nn.Linear(hidden, settings["projection_dim"])))
    return encoder


def randomised_encoder(seed: int = 0, **model) -> nn.Module:
    """An encoder whose BN affine weights and running statistics differ from their defaults, as after training."""
    torch.manual_seed(seed)
    encoder = build_encoder(**model)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return encoder


def write_run(run_dir: Path, encoder: nn.Module, **model) -> dict[str, torch.Tensor]:
    """A fake format-1 `soco pretrain` run folder: checkpoints/last.pt with the entries the old trainer wrote."""
    state = encoder.state_dict()
    target = {k: v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in state.items()}
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({
        "model": state, "predictor": {"0.weight": torch.zeros(2, 2)}, "target": target,
        "optimizer": {"state": {}, "param_groups": []}, "step": 12, "total_steps": 12,
        "config": {"model": {**LEGACY_MODEL_DEFAULTS, **model}, "train": {"method": "soco"}},
    }, run_dir / "checkpoints" / "last.pt")
    return state


def layout_of(checkpoint: dict) -> tuple[str, list[str]]:
    """The (kind, parts) a format-1 checkpoint's model config means, as the new engine would declare them."""
    model = {**LEGACY_MODEL_DEFAULTS, **checkpoint["config"]["model"]}
    if model["variant"] == "c4":
        return "c4", ["backbone", "res5"] if model["head"] else ["backbone"]
    kind = "fpn" if model["fpn"] else "c5"
    return kind, ["backbone"] + (["fpn"] if model["fpn"] else []) + (["box_head"] if model["head"] else [])


def to_layout2(checkpoint: dict, kind: str | None = None, parts: list[str] | None = None, *,
               method: str = "soco", target: bool = True) -> dict:
    """A format-2 checkpoint holding a format-1 checkpoint's encoders; kind and parts default to what they hold."""
    declared_kind, declared_parts = layout_of(checkpoint)
    model = {**LEGACY_MODEL_DEFAULTS, **checkpoint["config"]["model"]}
    converted = {
        "format_version": 2,
        "method": method,
        "method_state": {"predictor": checkpoint["predictor"]},
        "encoder": checkpoint["model"],
        "encoder_layout": {
            "kind": kind or declared_kind,
            "parts": list(declared_parts if parts is None else parts),
            "depth": model["depth"],
            "prefixes": dict(PREFIXES),
            "pooler": {"output_size": 14 if model["variant"] == "c4" else 7, "scale_aware": True},
        },
        "config": {"method": {"name": method, **model}, "train": {"steps": checkpoint["step"]}},
        "step": checkpoint["step"],
        "optimizer": checkpoint["optimizer"],
    }
    if "rng" in checkpoint:
        converted["rng"] = checkpoint["rng"]
    if target:
        converted["encoder_target"] = checkpoint["target"]
    return converted


def save_layout2(layout1_path: Path, path: Path, kind: str | None = None, parts: list[str] | None = None,
                 **options) -> Path:
    """Write to_layout2 of the checkpoint at layout1_path to path; returns path."""
    checkpoint = torch.load(layout1_path, map_location="cpu", weights_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_layout2(checkpoint, kind, parts, **options), path)
    return path
