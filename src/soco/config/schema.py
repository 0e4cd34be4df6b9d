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
class Config:
    """The whole configuration of a `soco` run."""

    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalsConfig = field(default_factory=ProposalsConfig)
