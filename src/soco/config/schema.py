"""The configuration schema: one dataclass per section, every field typed and defaulted."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    chunk_size: int = 32  # images per resumable chunk written to disk
    min_side: float = 32.0  # filter: both box sides at least this many pixels
    max_aspect: float = 3.0  # filter: 1/max_aspect <= w/h <= max_aspect
    min_relative_scale: float = 0.3  # filter: sqrt(wh)/sqrt(WH) lower bound
    max_relative_scale: float = 0.8  # filter: sqrt(wh)/sqrt(WH) upper bound


@dataclass
class ViewsConfig:
    """How the training views and their boxes are made (sizes in pixels, the paper's by default)."""

    v1_size: int = 224  # V1: the whole image, resized (aspect not preserved, as in the release)
    v2_size: int = 224  # V2: random resized crop
    v3_size: int = 112  # V3: V2 downsampled
    v4_size: int = 192  # V4 (SoCo* only): another random crop of V1
    use_v3: bool = True  # ablation "multi view" off: V1 and V2 only
    use_v4: bool = False  # SoCo*
    v3_mode: str = "downsample"  # "downsample" (paper) or "independent" (the release's own 112 crop)
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    flip_prob: float = 0.5
    crop_retries: int = 5  # re-draw a crop that no proposal overlaps, this many times
    proposals_per_image: int = 4  # K
    box_source: str = "proposals"  # "proposals", "random" (Table 5c) or "whole_image" (BYOL baseline)
    box_jitter: bool = True
    jitter_prob: float = 0.5
    jitter_ratio: float = 0.1
    color_augment: bool = True  # the BYOL colour pipeline


@dataclass
class ModelConfig:
    """The detector-aligned network: backbone, neck, RoI head, projector and predictor."""

    variant: str = "fpn"  # "fpn" (R50-FPN, 4conv1fc head) or "c4" (RoIAlign on C4, res5 head)
    depth: int = 50  # ResNet depth: 18, 34, 50, 101, 152
    fpn: bool = True  # ablation: off pools boxes on C5
    head: bool = True  # ablation: off replaces the 4conv1fc head by global average pooling
    scale_aware: bool = True  # ablation: off pools every box on `fixed_level`
    level_thresholds: list[float] = field(default_factory=lambda: [48.0, 96.0, 192.0])
    fixed_level: int = 5  # pyramid level (2..5) used when scale_aware is off
    pool_all_levels: bool = False  # the release's way: pool on every level and mask (for comparison)
    fpn_channels: int = 256
    head_convs: int = 4
    head_fc_dim: int = 1024
    projector_hidden: int = 4096
    projection_dim: int = 256
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP; plain BN on CPU or one process


@dataclass
class OptimConfig:
    """LARS with linear warm-up and cosine decay, stepped per iteration."""

    base_lr: float = 1.0  # lr = base_lr * total_batch / 256
    weight_decay: float = 1e-5
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    warmup_epochs: float = 10.0
    warmup_start_factor: float = 0.01  # warm-up starts at lr / 100
    final_lr: float = 1e-6
    ema_base: float = 0.99  # target momentum, raised to 1 by a cosine schedule


@dataclass
class TrainConfig:
    """Length, batch, devices and bookkeeping of a pretraining run."""

    method: str = "soco"
    epochs: float = 100.0
    steps: int = 0  # when > 0, overrides epochs
    batch_size: int = 64  # per process
    accumulate: int = 1  # gradient accumulation steps per optimiser step
    workers: int = -1  # data-loader workers per process; -1: chosen from the cores
    device: str = "auto"  # "auto", "cpu" or "cuda"
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16", "fp16"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500  # steps between periodic checkpoints
    keep_checkpoints: int = 3


@dataclass
class Config:
    """The whole configuration of a `soco` run."""

    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalsConfig = field(default_factory=ProposalsConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
