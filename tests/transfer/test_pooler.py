"""Tests of soco.transfer.pooler: the detector pools boxes exactly as pretraining did."""

from __future__ import annotations

import pytest
from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from soco.models.backbone import build_resnet_fpn, fpn_levels
from soco.models.heads import build_box_head
from soco.models.roi_pooling import DEFAULT_STRIDES, pool_boxes_per_level
from soco.transfer.detector import build_detector, load_pretrained
from soco.transfer.pooler import FPN_FEATURE_NAMES, AlignedMultiScaleRoIAlign

IMAGE_SIZE = 128
# Fractional corners, so that a half-cell shift shows; the whole-image box lands on P3, the others on P2.
BOXES = torch.tensor([
    [3.3, 5.7, 40.2, 33.9],
    [10.0, 20.0, 120.5, 110.25],
    [60.4, 2.2, 127.0, 70.6],
    [0.0, 0.0, 128.0, 128.0],
    [17.5, 80.1, 29.9, 99.8],
])


def _pretrained_parts(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A pretraining backbone and box head with every BN affine and statistic away from its init value."""
    torch.manual_seed(seed)
    backbone, box_head = build_resnet_fpn(18, fpn_channels=256), build_box_head()
    for module in [*backbone.modules(), *box_head.modules()]:
        if isinstance(module, nn.BatchNorm2d):
            # Zero-initialised residual BN would hide the residual branches from the comparison.
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
    return backbone.eval(), box_head.eval()


@pytest.mark.slow
def test_detector_box_features_equal_pretraining_box_features(tmp_path):
    backbone, box_head = _pretrained_parts()
    weights = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
               **{f"roi_heads.box_head.{k}": v for k, v in box_head.state_dict().items()}}
    torch.save(weights, tmp_path / "soco.pt")
    detector = build_detector("faster_rcnn", num_classes=2, depth=18)
    assert set(load_pretrained(detector, tmp_path / "soco.pt").loaded) == \
        {"backbone.body", "backbone.fpn", "roi_heads.box_head"}
    detector.eval()
    torch.manual_seed(1)
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    pool = detector.roi_heads.box_roi_pool
    assert isinstance(pool, AlignedMultiScaleRoIAlign) and pool.sampling_ratio == -1

    with torch.no_grad():
        features = detector.backbone(images)  # GeneralizedRCNNTransform bypassed: the same tensor on both sides
        detector_out = detector.roi_heads.box_head(pool(features, [BOXES], [(IMAGE_SIZE, IMAGE_SIZE)]))
        # The detector's own level of each box (torchvision's FPN rule), so that only the pooling differs.
        levels = pool.map_levels([BOXES])
        assert levels.tolist() == [0, 0, 0, 1, 0]
        pretraining_out = box_head(pool_boxes_per_level(fpn_levels(backbone, images), BOXES[None],
                                                        strides=DEFAULT_STRIDES, output_size=7, levels=levels))
        stock = MultiScaleRoIAlign(FPN_FEATURE_NAMES, 7, sampling_ratio=2)  # torchvision's default pooler
        stock_out = detector.roi_heads.box_head(stock(features, [BOXES], [(IMAGE_SIZE, IMAGE_SIZE)]))

    assert detector_out.shape == (len(BOXES), 1024) and detector_out.abs().mean() > 0.1
    assert torch.equal(detector_out, pretraining_out)  # measured: max abs difference 0
    # The test can fail: torchvision's stock pooler gives other features (measured: max abs difference 0.43,
    # mean |feature| 0.35).
    assert (stock_out - pretraining_out).abs().max() > 0.1


def test_mask_pooler_pools_as_pretraining_too():
    detector = build_detector("mask_rcnn", num_classes=2, depth=18)
    pool = detector.roi_heads.mask_roi_pool
    assert isinstance(pool, AlignedMultiScaleRoIAlign) and pool.output_size == (14, 14)
    torch.manual_seed(2)
    features = OrderedDict((str(i), torch.randn(2, 8, IMAGE_SIZE // s, IMAGE_SIZE // s))
                           for i, s in enumerate(DEFAULT_STRIDES))
    features["pool"] = torch.randn(2, 8, 2, 2)  # the extra FPN level is never pooled
    boxes = torch.stack([BOXES[:3], BOXES[2:]])  # two images, three boxes each
    pooled = pool(features, list(boxes), [(IMAGE_SIZE, IMAGE_SIZE)] * 2)
    levels = pool.map_levels(list(boxes))
    assert levels.tolist() == [0, 0, 0, 0, 1, 0]
    expected = pool_boxes_per_level(list(features.values())[:4], boxes, DEFAULT_STRIDES, output_size=14,
                                    levels=levels)
    assert pooled.shape == (6, 8, 14, 14) and torch.equal(pooled, expected)
    stock = MultiScaleRoIAlign(FPN_FEATURE_NAMES, 14, sampling_ratio=2)(features, list(boxes),
                                                                         [(IMAGE_SIZE, IMAGE_SIZE)] * 2)
    assert (stock - expected).abs().max() > 0.1


@pytest.mark.slow
def test_a_soco_encoder_exported_and_loaded_gives_the_detector_the_same_box_features(tmp_path):
    """End to end: SoCo's own encoder (BoxPooler, its level thresholds), its checkpoint, `soco export`, the detector."""
    from soco.config.loading import config_to_dict, load_config
    from soco.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from soco.export import export_checkpoint
    from soco.methods.soco import SoCo

    config = load_config("soco_small", ["method.views.v1_size=224"])  # R18-FPN, torchvision's widths
    torch.manual_seed(0)
    method = SoCo(config.method)
    for module in method.online.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-0.1, 0.1)
    save_checkpoint({"format_version": CHECKPOINT_FORMAT, "method": "soco", "step": 0,
                     "encoder": method.encoder().state_dict(), "encoder_layout": method.encoder_layout().to_dict(),
                     "config": config_to_dict(config)}, tmp_path / "run" / "checkpoints" / "last.pt")
    exported = export_checkpoint(tmp_path / "run", "torchvision", tmp_path / "soco.pt").output
    detector = build_detector("faster_rcnn", num_classes=2, depth=18)
    load_pretrained(detector, exported)
    detector.eval(), method.eval()
    size = 512
    # sqrt(area) <= 48 is P2 for both rules (SoCo's 48/96/192 at 224-pixel views, torchvision's canonical
    # 224 at level 4); >= 448 is P5 for both. In between the two rules differ by design (other image sizes).
    boxes = torch.tensor([[3.3, 5.7, 40.2, 33.9], [100.5, 200.25, 140.0, 245.5], [2.5, 7.5, 505.0, 490.0],
                          [30.0, 10.0, 511.0, 500.5]])
    torch.manual_seed(3)
    images = torch.rand(1, 3, size, size)
    with torch.no_grad():
        pretraining = method.online.representations(images, boxes[None])
        features = detector.backbone(images)
        pooled = detector.roi_heads.box_roi_pool(features, [boxes], [(size, size)])
        transferred = detector.roi_heads.box_head(pooled)
        encoder_levels = method.online.box_levels(boxes[None])
        detector_levels = detector.roi_heads.box_roi_pool.map_levels([boxes])  # set up by the first call
        assert encoder_levels.tolist() == detector_levels.tolist() == [0, 0, 3, 3]
    assert transferred.abs().mean() > 0.05
    torch.testing.assert_close(transferred, pretraining, rtol=0, atol=1e-6)


def test_a_c4_encoder_exported_and_loaded_gives_the_c4_detector_the_same_box_features(tmp_path):
    """SoCo's C4 variant (RoIAlign 14x14 on C4, res5 head) and faster_rcnn_c4 compute the same box features."""
    from soco.config.loading import config_to_dict, load_config
    from soco.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from soco.export import export_checkpoint
    from soco.methods.soco import SoCo

    config = load_config("soco_tiny", ["method.model.variant=c4", "method.views.use_v3=false"])  # R18-C4
    torch.manual_seed(0)
    method = SoCo(config.method)
    for module in method.online.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-0.1, 0.1)
    save_checkpoint({"format_version": CHECKPOINT_FORMAT, "method": "soco", "step": 0,
                     "encoder": method.encoder().state_dict(), "encoder_layout": method.encoder_layout().to_dict(),
                     "config": config_to_dict(config)}, tmp_path / "run" / "checkpoints" / "last.pt")
    exported = export_checkpoint(tmp_path / "run", "backbone", tmp_path / "resnet.pt").output
    detector = build_detector("faster_rcnn_c4", num_classes=2, depth=18)
    # R18 with 5 tensors per BN: stem 1 + 5; a block 2 + 10, with a downsample 18; layer1 2 blocks, layer2-3 18 + 12.
    assert load_pretrained(detector, exported).loaded == {"backbone.body": 6 + 2 * 12 + 2 * (18 + 12),
                                                          "roi_heads.box_head": 18 + 12}
    detector.eval(), method.eval()
    torch.manual_seed(3)
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        pretraining = method.online.representations(images, BOXES[None])
        features = detector.backbone(images)
        assert features["0"].shape[-1] == IMAGE_SIZE // 16
        transferred = detector.roi_heads.box_head(detector.roi_heads.box_roi_pool(features, [BOXES],
                                                                                 [(IMAGE_SIZE, IMAGE_SIZE)]))
        stock = MultiScaleRoIAlign(["0"], 14, sampling_ratio=2)(features, [BOXES], [(IMAGE_SIZE, IMAGE_SIZE)])
        stock_out = detector.roi_heads.box_head(stock)
    assert transferred.shape == (len(BOXES), 512) and transferred.abs().mean() > 0.05
    torch.testing.assert_close(transferred, pretraining, rtol=0, atol=1e-6)
    # measured: max abs difference 0; torchvision's stock pooler differs by 1.30 (mean |feature| 1.01).
    assert (stock_out - pretraining).abs().max() > 0.1
