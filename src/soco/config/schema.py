"""The configuration schema of a pretraining run: one dataclass per section, every field typed and defaulted.

The `method` section belongs to the method named by `method.name`: its dataclass is declared in the
method's own file and looked up in the method registry when a configuration is loaded. Each section
declares the allowed values of its keys with `@config_rules` and the relations between them in
`check_values` (`validation.py` walks both before anything is built or written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from soco.config.validation import ANY_TEXT, FRACTION, POSITIVE, PROBABILITY, Range, at_least, between, config_rules
from soco.config.validation import SEED, one_of
from soco.errors import ConfigError

# The names the engine accepts (tests/config/test_validation.py holds them equal to the engine's own).
PROPOSAL_ALGORITHMS = ("release", "package", "rich", "repaired")
OPTIMIZERS = ("lars", "sgd")
COSINE_PER = ("step", "epoch")
# LARS's trust ratio denominator: |grad + wd * p| (BYOL's optax LARS, SoCo's lars.py) or |grad| + wd * |p| (torchlars,
# which SCRL's release uses)
LARS_DENOMINATORS = ("update", "sum")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@config_rules(images=ANY_TEXT, cache_dir=ANY_TEXT)
@dataclass
class DataConfig:
    """Where the unlabeled images are and where downloaded or assembled data is cached."""

    images: str = ""  # image folder; empty means the built-in default photos
    cache_dir: str = ""  # empty means $SOCO_CACHE or ~/.cache/soco


@config_rules(
    algorithm=one_of(*PROPOSAL_ALGORITHMS), workers=at_least(0), min_side=at_least(0.0), max_aspect=at_least(1.0),
    min_relative_scale=between(0.0, 1.0), max_relative_scale=FRACTION,
)
@dataclass
class ProposalsConfig:
    """How object proposals are computed and filtered (`soco proposals`)."""

    algorithm: str = "release"  # "release" (default: SoCo's release's own), "package" (soco's earlier), "rich", "repaired"
    workers: int = 0  # processes; 0 means one per available core
    min_side: float = 32.0  # filter: both box sides at least this many pixels
    max_aspect: float = 3.0  # filter: 1/max_aspect <= w/h <= max_aspect
    min_relative_scale: float = 0.3  # filter: sqrt(wh)/sqrt(WH) lower bound
    max_relative_scale: float = 0.8  # filter: sqrt(wh)/sqrt(WH) upper bound

    def check_values(self) -> None:
        """The relative-scale range must not be empty."""
        if self.min_relative_scale > self.max_relative_scale:
            raise ConfigError(f"proposals.max_relative_scale: must be at least proposals.min_relative_scale "
                              f"({self.min_relative_scale}), not {self.max_relative_scale}")


@config_rules(
    name=one_of(*OPTIMIZERS), base_lr=POSITIVE, weight_decay=at_least(0.0), momentum=Range(0.0, 1.0, high_open=True),
    trust_coefficient=POSITIVE, warmup_epochs=at_least(0.0), warmup_start_factor=PROBABILITY, final_lr=at_least(0.0),
    cosine_per=one_of(*COSINE_PER), lars_denominator=one_of(*LARS_DENOMINATORS), lars_eps=at_least(0.0),
)
@dataclass
class OptimConfig:
    """The optimiser (LARS or SGD) with linear warm-up and cosine decay, stepped per iteration."""

    name: str = "lars"  # "lars" (BYOL, SoCo, SCRL) or "sgd" (MoCo-style methods)
    base_lr: float = 1.0  # lr = base_lr * total_batch / 256
    weight_decay: float = 1e-5
    momentum: float = 0.9
    nesterov: bool = False  # SGD only
    trust_coefficient: float = 0.001  # LARS only
    lars_denominator: str = "update"  # LARS only: the trust ratio's |grad + wd * p| ("update") or |grad| + wd * |p| ("sum")
    lars_eps: float = 0.0  # LARS only: added to the trust ratio's denominator (SoCo's and torchlars' 1e-8)
    warmup_epochs: float = 10.0
    warmup_start_factor: float = 0.01  # warm-up starts at lr / 100
    final_lr: float = 1e-6
    cosine_per: str = "step"  # "step": the cosine moves every iteration; "epoch": once per epoch (MoCo's)

    def check_values(self) -> None:
        """Nesterov momentum exists for SGD only, and needs a momentum (torch refuses it otherwise)."""
        if self.nesterov and self.name != "sgd":
            raise ConfigError(f"optim.nesterov: applies to optim.name=sgd only, not {self.name}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov: needs optim.momentum greater than 0")


@config_rules(
    epochs=POSITIVE, steps=at_least(0), batch_size=at_least(1), accumulate=at_least(1), workers=at_least(-1),
    device=one_of(*DEVICES), precision=one_of(*PRECISIONS), seed=SEED, log_every=at_least(1),
    checkpoint_every=at_least(1), keep_checkpoints=at_least(0),
)
@dataclass
class TrainConfig:
    """Length, batch, devices and bookkeeping of a pretraining run (the same for every method)."""

    epochs: float = 100.0  # the run's length when steps is 0
    steps: int = 0  # when > 0, the run's length (epochs is then ignored); 0: train for `epochs`
    batch_size: int = 64  # per process
    accumulate: int = 1  # gradient accumulation steps per optimiser step
    workers: int = -1  # data-loader workers per process; -1: chosen from the cores
    device: str = "auto"  # "auto", "cpu" or "cuda"
    precision: str = "auto"  # "auto" (bf16 on GPUs and on CPUs with native bf16, else fp32), "fp32", "bf16", "fp16"
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP; plain BN on CPU or one process
    channels_last: bool = True  # NHWC networks and views: 1.16x the bf16 step on this CPU, fp32 unchanged (speed.md)
    compile: bool = False  # torch.compile the backbones (minutes of compilation at the start of each process)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500  # steps between periodic checkpoints
    keep_checkpoints: int = 3  # periodic checkpoints kept besides last.pt

    def check_values(self) -> None:
        """fp16 autocast exists on GPUs only."""
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("train.precision: fp16 needs a GPU (train.device=cuda); use bf16 or fp32 on the CPU")


@dataclass
class Config:
    """The whole configuration of a `soco` pretraining run."""

    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalsConfig = field(default_factory=ProposalsConfig)
    method: Any = None  # the method's own config dataclass, chosen by `method.name` (default "soco")
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


DEFAULT_METHOD = "soco"
