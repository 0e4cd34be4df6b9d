"""`train.compile`: the methods' convolutional backbones compiled with `torch.compile` (TorchInductor).

Only the backbones (ResNet, and the FPN where there is one) are compiled: they take one fixed shape per
view size, so each compiles once per view size and mode (with gradients for the online network, without
for the target), and they hold almost all of a step's time. The RoI parts see data-dependent box counts per
pyramid level and stay eager. `nn.Module.compile` compiles in place, so parameter names, state dicts,
checkpoints, EMA updates and exports are exactly those of the eager model.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN

from soco.models.backbone import ResNetBody, ResNetStages

COMPILED_BACKBONES = (BackboneWithFPN, ResNetBody, ResNetStages)


def compile_backbones(model: nn.Module) -> list[str]:
    """Compile every outermost backbone of `model` in place; the names of the compiled modules.

    `dynamic=False` compiles one kernel set per view size: dynamic shapes would serve both sizes with slower
    generic kernels.
    """
    compiled: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, COMPILED_BACKBONES) and not any(name.startswith(f"{done}.") for done in compiled):
            module.compile(dynamic=False)
            compiled.append(name)
    return compiled
