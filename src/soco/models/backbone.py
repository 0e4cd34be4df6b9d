"""ResNet and ResNet-FPN backbones built from torchvision's own modules, so export to a detector is the identity."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from soco.errors import ConfigError

RESNET_BUILDERS = {
    18: resnet.resnet18,
    34: resnet.resnet34,
    50: resnet.resnet50,
    101: resnet.resnet101,
    152: resnet.resnet152,
}
# BackboneWithFPN names its outputs after the position of the returned layer: "0".."3" are P2..P5;
# its LastLevelMaxPool adds "pool" (P6), which SoCo does not use.
FPN_LEVEL_NAMES = ("0", "1", "2", "3")
FPN_STRIDES = (4, 8, 16, 32)
C4_STRIDE = 16
C5_STRIDE = 32
TORCHVISION_FPN_CHANNELS = 256  # _resnet_fpn_extractor hard-codes this width


def build_resnet(depth: int, zero_init_residual: bool = True) -> resnet.ResNet:
    """A randomly initialised torchvision ResNet; by default each residual block's last BN gamma is zero."""
    if depth not in RESNET_BUILDERS:
        raise ConfigError(f"ResNet depth {depth} is not one of {sorted(RESNET_BUILDERS)}")
    # Plain BatchNorm2d (torchvision's default): conversion to SyncBatchNorm is the engine's business.
    return RESNET_BUILDERS[depth](weights=None, zero_init_residual=zero_init_residual)


def c4_channels(network: resnet.ResNet) -> int:
    """Channels of C4 (the output of layer3) of a torchvision ResNet."""
    return _last_block_channels(network.layer3)


def c5_channels(network: resnet.ResNet) -> int:
    """Channels of C5 (the output of layer4) of a torchvision ResNet."""
    return _last_block_channels(network.layer4)


def _last_block_channels(layer: nn.Sequential) -> int:
    """Output channels of a ResNet stage, read from its last block's last BN."""
    block = layer[-1]
    last_norm = block.bn3 if isinstance(block, resnet.Bottleneck) else block.bn2
    return last_norm.num_features


def build_resnet_fpn(depth: int, fpn_channels: int = TORCHVISION_FPN_CHANNELS,
                     zero_init_residual: bool = True) -> BackboneWithFPN:
    """ResNet + FPN (P2-P5 with BN after the lateral and output convs) exactly as fasterrcnn_resnet50_fpn_v2 builds it."""
    network = build_resnet(depth, zero_init_residual=zero_init_residual)
    if fpn_channels == TORCHVISION_FPN_CHANNELS:
        # The very call of torchvision's v2 builder; trainable_layers=5 leaves every parameter trainable.
        return _resnet_fpn_extractor(network, trainable_layers=5, norm_layer=nn.BatchNorm2d)
    # Only the FPN width differs from torchvision's builder, which cannot change it: same modules otherwise.
    in_channels_list = [_last_block_channels(getattr(network, f"layer{k}")) for k in (1, 2, 3, 4)]
    return BackboneWithFPN(
        network,
        return_layers={f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
        in_channels_list=in_channels_list,
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d,
    )


def fpn_levels(backbone: BackboneWithFPN, images: torch.Tensor) -> list[torch.Tensor]:
    """P2..P5 of a BackboneWithFPN for a batch of images (the extra 'pool' level is dropped)."""
    outputs = backbone(images)
    return [outputs[name] for name in FPN_LEVEL_NAMES]


class ResNetBody(nn.Module):
    """A torchvision ResNet truncated after one stage (layer3 for C4, layer4 for C5), returning that stage's map."""

    def __init__(self, network: resnet.ResNet, last_layer: str):
        super().__init__()
        if last_layer not in ("layer3", "layer4"):
            raise ValueError(f"last_layer must be 'layer3' or 'layer4', got {last_layer!r}")
        # Named `body` like BackboneWithFPN's trunk, so every variant's ResNet keys read backbone.body.*.
        self.body = IntermediateLayerGetter(network, return_layers={last_layer: "0"})
        self.out_channels = c4_channels(network) if last_layer == "layer3" else c5_channels(network)
        self.stride = C4_STRIDE if last_layer == "layer3" else C5_STRIDE

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The last stage's feature map under key '0'."""
        return self.body(images)


class ResNetStages(nn.Module):
    """A torchvision ResNet without pooling and classifier, returning res2..res5 under keys '0'..'3'."""

    def __init__(self, network: resnet.ResNet):
        super().__init__()
        # Named `body` like BackboneWithFPN's trunk, so the ResNet keys read backbone.body.* here too.
        self.body = IntermediateLayerGetter(network, return_layers={f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)})
        self.out_channels = [_last_block_channels(getattr(network, f"layer{k}")) for k in (1, 2, 3, 4)]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The four stages' maps, strides 4, 8, 16, 32."""
        return self.body(images)


def zero_initialised_norms(network: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BN of every residual block in a module: the ones zero_init_residual sets to zero."""
    norms = []
    for module in network.modules():
        if isinstance(module, resnet.Bottleneck):
            norms.append(module.bn3)
        elif isinstance(module, resnet.BasicBlock):
            norms.append(module.bn2)
    return norms
