"""The Method contract: what every pretraining method declares, and the plumbing they all share.

A method file declares only what it adds (following solo-learn's BaseMethod): its config dataclass,
its sample transform, its networks, `training_step`, and which of its modules is the detector-aligned
encoder that export writes out. The engine, the data set and export talk to a method only through
this contract, so adding a method never touches them.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from soco.declarations import MethodPresets, PresetOfSize, StudyArm
from soco.encoder_layout import (  # noqa: F401 - the contract's names, for methods and the contract test
    ENCODER_PARTS,
    EncoderLayout,
    backbone_only_layout,
)
from soco.methods.parameter_groups import lars_param_groups


class Method(nn.Module, metaclass=ABCMeta):
    """A self-supervised pretraining method; subclasses set `name` and `config_class` and fill the contract.

    Its nn.Module state dict is everything a resume needs (online and target networks, queues);
    `forward(batch)` is `training_step(batch)`, so DDP can wrap the whole method.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)
    presets: ClassVar[MethodPresets | None] = None  # the preset per model size, and where they are
    study_arms: ClassVar[tuple[StudyArm, ...]] = ()  # the arms the method adds to `soco study`
    default_preset: ClassVar[str] = PresetOfSize("small")  # what `soco pretrain --method NAME` starts from
    tiny_preset: ClassVar[str] = PresetOfSize("tiny")  # the smallest preset, which the contract test runs
    # The sample transform, built from the section's `views`; its `needs_proposals` says whether a run reads them.
    transform_class: ClassVar[type] = type(None)

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # --- data -------------------------------------------------------------------------------------
    @classmethod
    def uses_proposals(cls, config: Any) -> bool:
        """Whether a run with this `method:` section reads object proposals (so a store must be computed first).

        The transform declares it (`needs_proposals`, which the data set reads too); a method never does.
        """
        return bool(cls.transform_class(config.views).needs_proposals)

    @classmethod
    def smallest_batch_size(cls, config: Any, world_size: int = 1) -> tuple[int, str]:
        """(the fewest images per process and micro-batch the networks train on, why), for a section and process count.

        `train.batch_size` below it is refused while the configuration loads (`config.validation`), so that a
        method's BatchNorm needs are one line before anything is written, not a traceback in the first step.
        """
        return 1, ""

    def sample_transform(self):
        """The picklable transform the data set applies to each image (see soco.data.dataset.SampleTransform)."""
        return self.transform_class(self.config.views)

    # --- training ---------------------------------------------------------------------------------
    @abstractmethod
    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """The loss of one batch (already on the training device) as {"loss": scalar, other metrics...}."""

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """`training_step`, so that DistributedDataParallel sees the call."""
        return self.training_step(batch)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters in groups: decayed and LARS-adapted weights; biases and norm parameters excluded.

        BYOL's rule, by module type and dimension rather than by name. Every group carries "lars" (trust
        ratio on or off), which plain SGD ignores.
        """
        return lars_param_groups(self, weight_decay)

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Work after each optimiser step (a target network's EMA, say); returns metrics to log."""
        return {}

    # --- export -----------------------------------------------------------------------------------
    @abstractmethod
    def encoder(self) -> nn.Module:
        """The online detector-aligned encoder, whose state dict export writes out under `encoder_layout()`."""

    def target_encoder(self) -> nn.Module | None:
        """The momentum (target) copy of the encoder, if the method has one."""
        return None

    @abstractmethod
    def encoder_layout(self) -> EncoderLayout:
        """What the encoder holds: kind, parts (of ENCODER_PARTS), depth, key prefixes, pooling."""

    # --- pictures ---------------------------------------------------------------------------------
    def draw_batch(self, batch: dict, path: Path) -> Path | None:
        """Save a picture of one batch as the method sees it (views and boxes); None if it has no picture."""
        return None
