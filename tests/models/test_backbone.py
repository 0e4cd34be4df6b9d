"""Tests that the backbones are torchvision's own modules: strict key match with Faster R-CNN v2, zero-init residual."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d

from soco.errors import ConfigError
from soco.models.backbone import (
    FPN_STRIDES,
    ResNetBody,
    build_resnet,
    build_resnet_fpn,
    fpn_levels,
    zero_initialised_norms,
)
from soco.methods.soco import PAPER_THRESHOLDS, SoCoModelConfig, build_encoder


def parameter_count(*modules: torch.nn.Module) -> int:
    """Number of parameter elements in the modules."""
    return sum(p.numel() for module in modules for p in module.parameters())


@pytest.fixture(scope="module")
def torchvision_detector():
    """torchvision's Faster R-CNN R50-FPN v2, randomly initialised."""
    return fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)


@pytest.fixture(scope="module")
def r50_encoder():
    """The default (R50-FPN, 4conv1fc) object encoder."""
    return build_encoder(SoCoModelConfig(depth=50), PAPER_THRESHOLDS)


@pytest.mark.slow
def test_r50_fpn_backbone_and_box_head_load_strictly_into_torchvision(torchvision_detector, r50_encoder):
    assert isinstance(r50_encoder.backbone, BackboneWithFPN)
    torchvision_detector.backbone.load_state_dict(r50_encoder.backbone.state_dict(), strict=True)
    torchvision_detector.roi_heads.box_head.load_state_dict(r50_encoder.box_head.state_dict(), strict=True)
    # And back: the same key sets and shapes both ways.
    r50_encoder.backbone.load_state_dict(torchvision_detector.backbone.state_dict(), strict=True)
    r50_encoder.box_head.load_state_dict(torchvision_detector.roi_heads.box_head.state_dict(), strict=True)


def test_r50_fpn_parameter_count_matches_torchvision(torchvision_detector, r50_encoder):
    ours = parameter_count(r50_encoder.backbone, r50_encoder.box_head)
    theirs = parameter_count(torchvision_detector.backbone, torchvision_detector.roi_heads.box_head)
    assert ours == theirs
    assert all(p.requires_grad for p in r50_encoder.backbone.parameters())


def test_r50_fpn_has_bn_after_lateral_and_output_convs(r50_encoder):
    fpn = r50_encoder.backbone.fpn
    for block in list(fpn.inner_blocks) + list(fpn.layer_blocks):
        conv, norm = block[0], block[1]
        assert conv.bias is None and isinstance(norm, torch.nn.BatchNorm2d)
    assert sum(p.numel() for p in fpn.extra_blocks.parameters()) == 0


@pytest.mark.parametrize("depth", [18, 50])
def test_zero_init_residual(depth):
    network = build_resnet(depth)
    norms = zero_initialised_norms(network)
    assert len(norms) == {18: 8, 50: 16}[depth]
    assert all(torch.count_nonzero(norm.weight) == 0 for norm in norms)
    assert torch.count_nonzero(network.bn1.weight) == network.bn1.weight.numel()


def test_zero_init_residual_survives_in_the_fpn_backbone():
    norms = zero_initialised_norms(build_resnet_fpn(18))
    assert len(norms) == 8 and all(torch.count_nonzero(norm.weight) == 0 for norm in norms)


def test_plain_batchnorm_everywhere():
    backbone = build_resnet_fpn(18)
    kinds = {type(m) for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)}
    assert kinds == {torch.nn.BatchNorm2d}
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())


def test_r18_fpn_levels_shapes_and_strides():
    backbone = build_resnet_fpn(18).eval()
    with torch.no_grad():
        levels = fpn_levels(backbone, torch.randn(2, 3, 64, 64))
    assert [tuple(level.shape) for level in levels] == [(2, 256, 64 // s, 64 // s) for s in FPN_STRIDES]


def test_non_default_fpn_width_keeps_torchvision_key_names():
    default_keys = set(build_resnet_fpn(18).state_dict())
    narrow = build_resnet_fpn(18, fpn_channels=128)
    assert set(narrow.state_dict()) == default_keys
    assert narrow.fpn.layer_blocks[0][0].out_channels == 128


@pytest.mark.parametrize(("last_layer", "channels", "size"), [("layer3", 256, 4), ("layer4", 512, 2)])
def test_resnet_body(last_layer, channels, size):
    body = ResNetBody(build_resnet(18), last_layer).eval()
    assert body.out_channels == channels
    with torch.no_grad():
        assert body(torch.randn(1, 3, 64, 64))["0"].shape == (1, channels, size, size)
    assert all(key.startswith("body.") for key in body.state_dict())
    assert not any(key.startswith("body.fc") for key in body.state_dict())


def test_unknown_depth_is_a_config_error():
    with pytest.raises(ConfigError):
        build_resnet(42)
