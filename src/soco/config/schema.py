"""The configuration schema of a pretraining run: one dataclass per section, every field typed and defaulted.

The `method` section belongs to the method named by `method.name`: its dataclass is declared in the
method's own file and looked up in the method registry when a configuration is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    """Where the unlabeled images are and where downloaded or assembled data is cached."""

    images: str = ""  # image folder; empty means the built-in default photos
    cache_dir: str = ""  # empty means $SOCO_CACHE or ~/.cache/soco


@dataclass
class ProposalsConfig:
    """How object proposals are computed and filtered (`soco proposals`)."""

    algorithm: str = "fast"  # "fast" (default) or "reference" (the paper's selective search)
    workers: int = 0  # processes; 0 means one per available core
    min_side: float = 32.0  # filter: both box sides at least this many pixels
    max_aspect: float = 3.0  # filter: 1/max_aspect <= w/h <= max_aspect
    min_relative_scale: float = 0.3  # filter: sqrt(wh)/sqrt(WH) lower bound
    max_relative_scale: float = 0.8  # filter: sqrt(wh)/sqrt(WH) upper bound


@dataclass
class OptimConfig:
    """The optimiser (LARS or SGD) with linear warm-up and cosine decay, stepped per iteration."""

    name: str = "lars"  # "lars" (BYOL, SoCo, SCRL) or "sgd" (MoCo-style methods)
    base_lr: float = 1.0  # lr = base_lr * total_batch / 256
    weight_decay: float = 1e-5
    momentum: float = 0.9
    nesterov: bool = False  # SGD only
    trust_coefficient: float = 0.001  # LARS only
    warmup_epochs: float = 10.0
    warmup_start_factor: float = 0.01  # warm-up starts at lr / 100
    final_lr: float = 1e-6
    cosine_per: str = "step"  # "step": the cosine moves every iteration; "epoch": once per epoch (MoCo's)


@dataclass
class TrainConfig:
    """Length, batch, devices and bookkeeping of a pretraining run (the same for every method)."""

    epochs: float = 100.0
    steps: int = 0  # when > 0, overrides epochs
    batch_size: int = 64  # per process
    accumulate: int = 1  # gradient accumulation steps per optimiser step
    workers: int = -1  # data-loader workers per process; -1: chosen from the cores
    device: str = "auto"  # "auto", "cpu" or "cuda"
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16", "fp16"
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP; plain BN on CPU or one process
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500  # steps between periodic checkpoints
    keep_checkpoints: int = 3


@dataclass
class Config:
    """The whole configuration of a `soco` pretraining run."""

    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalsConfig = field(default_factory=ProposalsConfig)
    method: Any = None  # the method's own config dataclass, chosen by `method.name` (default "soco")
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


DEFAULT_METHOD = "soco"
