"""RoI heads that turn pooled box features into object vectors, and the MLP used as projector and predictor."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

HEAD_CONV_CHANNELS = 256  # width of the 4conv1fc head's convs in torchvision v2 and Detectron2 alike


def build_box_head(
    in_channels: int = 256,
    num_convs: int = 4,
    fc_dim: int = 1024,
    pooled_size: int = 7,
    conv_channels: int = HEAD_CONV_CHANNELS,
) -> FastRCNNConvFCHead:
    """The "4conv1fc" box head with BN, exactly torchvision's fasterrcnn_resnet50_fpn_v2 box head by default."""
    return FastRCNNConvFCHead(
        (in_channels, pooled_size, pooled_size),
        [conv_channels] * num_convs,
        [fc_dim],
        norm_layer=nn.BatchNorm2d,
    )


class GlobalAveragePool(nn.Module):
    """Head-off ablation: the mean of each pooled RoI feature map, (N, C, S, S) -> (N, C)."""

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Average over the spatial dimensions."""
        return pooled.mean(dim=(2, 3))


class C4Head(nn.Module):
    """C4 variant's head: ResNet's res5 (layer4) on 14x14 RoI features -> 7x7 -> global average pool."""

    def __init__(self, layer4: nn.Sequential):
        super().__init__()
        self.layer4 = layer4

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, C4 channels, 14, 14) -> (N, C5 channels)."""
        return self.layer4(pooled).mean(dim=(2, 3))


class MLP(nn.Sequential):
    """Linear, BatchNorm1d, ReLU, Linear: BYOL's projector (1024-4096-256) and predictor (256-4096-256).

    `last_bias=False` drops the output layer's bias (SCRL's release).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, last_bias: bool = True):
        super().__init__(
            OrderedDict(
                linear1=nn.Linear(in_dim, hidden_dim),
                norm=nn.BatchNorm1d(hidden_dim),
                relu=nn.ReLU(inplace=True),
                linear2=nn.Linear(hidden_dim, out_dim, bias=last_bias),
            )
        )
        self.in_dim = in_dim
        self.out_dim = out_dim
