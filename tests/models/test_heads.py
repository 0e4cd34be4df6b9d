"""Tests of the box heads (4conv1fc, head off, C4 res5) and the MLP projector/predictor."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from soco.models.backbone import build_resnet
from soco.models.heads import MLP, C4Head, GlobalAveragePool, build_box_head


def test_default_box_head_is_torchvision_4conv1fc():
    head = build_box_head()
    reference = FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d)
    assert isinstance(head, FastRCNNConvFCHead)
    assert {k: v.shape for k, v in head.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert head(torch.randn(3, 256, 7, 7)).shape == (3, 1024)
    assert head[5].in_features == 256 * 7 * 7  # fc1 after 4 convs and Flatten


def test_box_head_on_c5_channels_and_custom_sizes():
    head = build_box_head(in_channels=512, num_convs=2, fc_dim=64)
    assert head[0][0].in_channels == 512
    output = head(torch.randn(2, 512, 7, 7))
    assert output.shape == (2, 64)
    assert (output >= 0).all()  # the fc is followed by ReLU


def test_box_head_without_convs():
    head = build_box_head(in_channels=16, num_convs=0, fc_dim=32)
    assert head(torch.randn(2, 16, 7, 7)).shape == (2, 32)


def test_global_average_pool_is_the_spatial_mean():
    pooled = torch.randn(4, 8, 7, 7)
    torch.testing.assert_close(GlobalAveragePool()(pooled), pooled.mean(dim=(2, 3)))


def test_c4_head_halves_14x14_and_pools():
    network = build_resnet(18)
    head = C4Head(network.layer4)
    assert head.layer4 is network.layer4
    assert head(torch.randn(2, 256, 14, 14)).shape == (2, 512)
    features = head.layer4(torch.randn(1, 256, 14, 14))
    assert features.shape[-2:] == (7, 7)


def test_mlp_layers_and_shapes():
    projector = MLP(1024, 4096, 256)
    assert [type(m) for m in projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (projector.linear1.in_features, projector.linear1.out_features) == (1024, 4096)
    assert (projector.linear2.in_features, projector.linear2.out_features) == (4096, 256)
    assert projector(torch.randn(6, 1024)).shape == (6, 256)
    predictor = MLP(256, 64, 256).eval()
    assert predictor(torch.randn(1, 256)).shape == (1, 256)
