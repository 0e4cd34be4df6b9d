"""MoCo-style methods: a query encoder, a key encoder by constant-momentum EMA run with shuffle-BN, key queues.

What InsLoc and DetCo share (following solo-learn's BaseMomentumMethod one level up): the section's MoCo keys
with their rules (`MoCoConfig`, `MoCoModelConfig`), the key encoder and its queues, MoCo v2's SGD parameter
groups, and the shuffled key pass. A MoCo method declares its own keys, its encoder and its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from soco.config.validation import ANY_TEXT, POSITIVE, PROBABILITY, at_least, config_rules, one_of
from soco.methods.momentum import MomentumMethod
from soco.methods.parameter_groups import decay_everything
from soco.methods.queue import KeyQueue
from soco.methods.shuffle_bn import shuffled_forward
from soco.models.backbone import RESNET_BUILDERS


@config_rules(depth=one_of(*sorted(RESNET_BUILDERS)), embedding_dim=at_least(1))
@dataclass
class MoCoModelConfig:
    """The network keys every MoCo-style method has: the ResNet, the embedding's width, the initialisation."""

    depth: int = 50
    embedding_dim: int = 128
    zero_init_residual: bool = False  # the releases keep the last BN of each block at gamma 1


@config_rules(
    name=ANY_TEXT, momentum=PROBABILITY, temperature=POSITIVE, queue_size=at_least(1), key_bn_splits=at_least(1),
)
@dataclass
class MoCoConfig:
    """The `method:` keys every MoCo-style method has; a method's section subclasses it with its own."""

    name: str = ""
    momentum: float = 0.999  # constant EMA of the key encoder
    temperature: float = 0.2
    queue_size: int = 65536  # keys per queue (InsLoc: a queue per FPN level; DetCo: a global and a local per stage)
    key_bn_splits: int = 2  # one process: the key encoder's BatchNorm sees this many shuffled sub-batches


class MoCoMethod(MomentumMethod):
    """The query encoder `online`, its key encoder `target` (constant-momentum EMA) and the key queues `queue`.

    The state dict holds online.*, target.* and queue.* in that order, as InsLoc's and DetCo's always did.
    """

    def __init__(self, config: MoCoConfig, online: nn.Module, queues: int):
        super().__init__(config, momentum_base=config.momentum, momentum_schedule="constant")
        self.online = online
        self.make_target("online", "target")
        self.queue = KeyQueue(queues, config.model.embedding_dim, config.queue_size)

    @classmethod
    def smallest_batch_size(cls, config: MoCoConfig, world_size: int = 1) -> tuple[int, str]:
        """Two images per key sub-batch: on one process the key encoder's BatchNorm sees key_bn_splits of them."""
        if world_size > 1:  # the processes' slices of the shuffled global batch are the sub-batches
            return 2, "the key encoder's BatchNorm normalises each process's slice of the shuffled keys and needs two"
        splits = config.key_bn_splits
        hint = "; lower method.key_bn_splits for a smaller batch" if splits > 1 else ""
        return 2 * splits, (f"on one process the key encoder's BatchNorm sees method.key_bn_splits={splits} shuffled "
                            f"sub-batches of at least 2 images each{hint}")

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """MoCo v2's SGD: every trainable parameter decayed, BatchNorm and biases included, as released."""
        return decay_everything(self, weight_decay)

    def target_keys(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The key encoder's (levels, B, D) vectors of a batch; overridden where the target takes other inputs."""
        return self.target(*inputs)

    def shuffled_keys(self, *inputs: torch.Tensor) -> torch.Tensor:
        """`target_keys(*inputs)` with shuffle-BN (batch on dim 0 of each input): (levels, B, D), in batch order."""

        def batch_first(*shuffled: torch.Tensor) -> torch.Tensor:
            return self.target_keys(*shuffled).transpose(0, 1)

        return shuffled_forward(batch_first, inputs, self.config.key_bn_splits).transpose(0, 1)
