"""What a method declares about itself besides its code: its presets per model size and its arms in `soco study`.

A Method class sets `presets = MethodPresets(...)` and `study_arms = (StudyArm(...), ...)`; the registry hands
them to the configuration loader (where preset files are found) and to the study (which arms exist), so that
neither keeps a list of methods. It imports nothing of soco, so every package may read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

__all__ = ["MODEL_SIZES", "STUDY_EXPORTS", "MethodPresets", "PresetOfSize", "StudyArm"]

# 'tiny': the smallest, for tests; 'small': a CPU run, what `soco pretrain --method NAME` starts from;
# 'r50': the paper's ResNet-50 configuration
MODEL_SIZES = ("tiny", "small", "r50")
# the export formats the study's fine-tuning reads (soco.transfer.weights)
STUDY_EXPORTS = ("torchvision", "backbone")
LAST_ORDER = 1000  # where an arm that declares no order stands: after the built-in methods' arms


@dataclass(frozen=True)
class MethodPresets:
    """A method's preset per model size, and the folder its YAML files are in (None: soco/config/presets)."""

    tiny: str
    small: str
    r50: str
    # A method outside the package keeps its presets beside its own file: the loader finds a preset name there
    # when the package has none of that name.
    folder: Path | None = None

    def __post_init__(self):
        for size in MODEL_SIZES:
            if not isinstance(getattr(self, size), str) or not getattr(self, size):
                raise TypeError(f"MethodPresets.{size}: a preset name, not {getattr(self, size)!r}")
        if self.folder is not None:
            object.__setattr__(self, "folder", Path(self.folder))

    def for_size(self, size: str) -> str:
        """The preset of one model size ('tiny', 'small' or 'r50')."""
        if size not in MODEL_SIZES:
            raise KeyError(f"model size {size!r} (sizes: {', '.join(MODEL_SIZES)})")
        return getattr(self, size)

    def by_size(self) -> dict[str, str]:
        """{model size: preset name}, smallest first."""
        return {size: getattr(self, size) for size in MODEL_SIZES}


@dataclass(frozen=True)
class StudyArm:
    """One arm of `soco study` a method contributes: a way to pretrain the detector's start, and how it is used."""

    name: str  # the arm's name in --arms, folders and reports
    note: str  # what the arm pretrains, in a few words (`soco methods`, `soco study --plan`)
    # None: the declaring method's own presets (the registry fills them in); only the study's scratch arm,
    # which pretrains nothing, is left without presets
    presets: MethodPresets | None = None
    # the method pretrains an FPN and a box head: the budget's head overrides give them the detector's widths
    pretrains_fpn_and_head: bool = False
    exports: str = "torchvision"  # the format the study exports the arm's encoder to for fine-tuning
    # budget name -> overrides of this arm alone, for what must scale with the budget's data, not the model
    budget_overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    order: int = LAST_ORDER  # arms run and are reported by rising order, then by name; scratch comes first

    def __post_init__(self):
        if not self.name or "@" in self.name or "/" in self.name:
            raise TypeError(f"StudyArm name {self.name!r}: a non-empty name without '@' or '/'")
        if self.exports not in STUDY_EXPORTS:
            raise TypeError(f"StudyArm {self.name}: exports {self.exports!r}, not one of {', '.join(STUDY_EXPORTS)}")
        overrides = {}
        for budget, texts in dict(self.budget_overrides).items():
            if isinstance(texts, str) or not all(isinstance(text, str) and "=" in text for text in texts):
                raise TypeError(f"StudyArm {self.name}: budget_overrides[{budget!r}] must be key=value strings")
            overrides[budget] = tuple(texts)
        object.__setattr__(self, "budget_overrides", MappingProxyType(overrides))

    def overrides_for(self, budget_name: str) -> tuple[str, ...]:
        """The overrides this arm adds under the budget called `budget_name` (none by default)."""
        return self.budget_overrides.get(budget_name, ())


class PresetOfSize:
    """A class attribute that reads one size of the class's `presets` ('' without presets).

    `Method.default_preset` and `Method.tiny_preset` are these, so a method names each preset once; a class
    that assigns the attribute itself overrides it.
    """

    def __init__(self, size: str):
        if size not in MODEL_SIZES:
            raise ValueError(f"model size {size!r} (sizes: {', '.join(MODEL_SIZES)})")
        self.size = size

    def __get__(self, instance, owner: type) -> str:
        presets = getattr(owner, "presets", None)
        return presets.for_size(self.size) if presets is not None else ""
