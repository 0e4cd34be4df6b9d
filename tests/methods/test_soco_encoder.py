"""SoCo's ObjectEncoder as its builder composes it: shapes per variant and ablation, pooling ways, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.detection.backbone_utils import BackboneWithFPN

from soco.config.validation import validate_section
from soco.errors import ConfigError
from soco.methods.soco import PAPER_THRESHOLDS, SoCoModelConfig, build_encoder
from soco.models.backbone import ResNetBody
from soco.models.heads import C4Head, GlobalAveragePool
from soco.models.roi_pooling import assign_levels

SMALL_THRESHOLDS = [16.0, 32.0, 56.0]  # so boxes in 96-px views reach all four levels


def small_config(**overrides) -> SoCoModelConfig:
    """An R18 config with a narrow projector, for fast CPU tests."""
    values = dict(depth=18, projector_hidden=64, projection_dim=32)
    values.update(overrides)
    return SoCoModelConfig(**values)


def ObjectEncoder(config: SoCoModelConfig):  # noqa: N802 - reads like the class these tests build
    """SoCo's encoder; the paper's 48/96/192 thresholds unless the config gives its own."""
    return build_encoder(config, tuple(config.level_thresholds) or PAPER_THRESHOLDS)


def spread_boxes(batch: int, size: int) -> torch.Tensor:
    """(batch, 4, 4) boxes of sqrt(area) 12, 28, 48 and 80 px in a size x size view, shifted per image."""
    rows = []
    for image in range(batch):
        offset = 2.0 * image
        rows.append([[offset, offset, offset + side, offset + side] for side in (12.0, 28.0, 48.0, 80.0)])
    boxes = torch.tensor(rows)
    assert boxes.max() <= size
    return boxes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "representation_dim", "backbone_type", "head_type"),
    [
        (dict(), 1024, BackboneWithFPN, torch.nn.Sequential),
        (dict(variant="c4"), 512, ResNetBody, C4Head),
        (dict(head=False), 256, BackboneWithFPN, GlobalAveragePool),
        (dict(fpn=False), 1024, ResNetBody, torch.nn.Sequential),
        (dict(fpn=False, head=False), 512, ResNetBody, GlobalAveragePool),
        (dict(variant="c4", head=False), 256, ResNetBody, GlobalAveragePool),
        (dict(scale_aware=False, fixed_level=3), 1024, BackboneWithFPN, torch.nn.Sequential),
        (dict(pool_all_levels=True), 1024, BackboneWithFPN, torch.nn.Sequential),
    ],
)
def test_output_shapes_r18_64px(overrides, representation_dim, backbone_type, head_type):
    torch.manual_seed(0)
    encoder = ObjectEncoder(small_config(**overrides))
    assert isinstance(encoder.backbone, backbone_type)
    assert isinstance(encoder.box_head, head_type)
    assert encoder.representation_dim == representation_dim
    images = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[0.0, 0.0, 30.0, 30.0], [8.0, 4.0, 60.0, 50.0], [1.0, 2.0, 63.0, 63.0]]] * 2)
    projections = encoder(images, boxes)
    assert projections.shape == (6, 32)
    assert torch.isfinite(projections).all()
    encoder.eval()
    with torch.no_grad():
        assert encoder.representations(images, boxes).shape == (6, representation_dim)


def test_fpn_off_head_takes_c5_channels():
    encoder = ObjectEncoder(small_config(fpn=False))
    assert encoder.box_head[0][0].in_channels == 512
    assert encoder.pooler.strides == (32,)


def test_c4_pools_14x14_and_head_is_layer4():
    encoder = ObjectEncoder(small_config(variant="c4"))
    assert encoder.pooler.output_size == 14 and encoder.pooler.strides == (16,)
    assert not any(key.startswith("body.layer4") for key in encoder.backbone.state_dict())
    assert any(key.startswith("layer4.") for key in encoder.box_head.state_dict())


def test_pool_all_levels_equals_per_level_in_eval_mode():
    torch.manual_seed(1)
    per_level = ObjectEncoder(small_config(level_thresholds=SMALL_THRESHOLDS))
    all_levels = ObjectEncoder(small_config(level_thresholds=SMALL_THRESHOLDS, pool_all_levels=True))
    # Non-trivial BN running statistics, so eval mode really normalises with them.
    for module in per_level.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    all_levels.load_state_dict(per_level.state_dict(), strict=True)
    per_level.eval()
    all_levels.eval()
    images = torch.randn(3, 3, 96, 96)
    boxes = spread_boxes(3, 96)
    assert set(assign_levels(boxes.reshape(-1, 4), SMALL_THRESHOLDS).tolist()) == {0, 1, 2, 3}
    with torch.no_grad():
        expected = per_level(images, boxes)
        actual = all_levels(images, boxes)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_pool_all_levels_in_train_mode_runs():
    # Train-mode BN statistics differ between the two ways (see ObjectEncoder.representations): shape only.
    torch.manual_seed(2)
    encoder = ObjectEncoder(small_config(level_thresholds=SMALL_THRESHOLDS, pool_all_levels=True))
    projections = encoder(torch.randn(2, 3, 96, 96), spread_boxes(2, 96))
    assert projections.shape == (8, 32)
    projections.square().sum().backward()


def test_scale_aware_off_pools_every_box_on_fixed_level():
    encoder = ObjectEncoder(small_config(scale_aware=False, fixed_level=4))
    levels = encoder.box_levels(spread_boxes(2, 96))
    assert levels.tolist() == [2] * 8


def test_every_parameter_gets_a_gradient_when_boxes_use_one_level():
    # All boxes on P2: the other levels' output convs must still get (zero) gradients for DDP.
    torch.manual_seed(3)
    encoder = ObjectEncoder(small_config())
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 40.0, 30.0]]] * 2)
    encoder(torch.randn(2, 3, 64, 64), boxes).square().sum().backward()
    missing = [name for name, p in encoder.named_parameters() if p.grad is None]
    assert missing == []


def test_online_and_target_are_independent_copies():
    online = ObjectEncoder(small_config())
    target = copy.deepcopy(online)
    names = {name for name, _ in online.named_children()}
    assert names == {"backbone", "pooler", "box_head", "projector"}
    assert not online.pooler.state_dict()  # the weights export reads are backbone.*, box_head.*, projector.*
    assert all(a is not b for a, b in zip(online.parameters(), target.parameters()))


@pytest.mark.parametrize(
    "overrides",
    [dict(variant="c5"), dict(fixed_level=6), dict(level_thresholds=[48.0, 40.0, 192.0]), dict(depth=20)],
)
def test_invalid_configs_raise(overrides):
    # The section is checked once, where it is loaded, before any encoder is built.
    with pytest.raises(ConfigError, match="^method.model."):
        validate_section(small_config(**overrides), "method.model")


def test_boxes_must_match_images():
    encoder = ObjectEncoder(small_config())
    with pytest.raises(ValueError):
        encoder(torch.randn(2, 3, 64, 64), torch.zeros(3, 2, 4))
