"""The study's arms, readings and budgets: what each arm pretrains with and how every arm is fine-tuned."""

from __future__ import annotations

from dataclasses import dataclass, field

from soco.config.validation import ANY_TEXT, at_least, config_rules, each, keywords_of, list_of, mapping_of, one_of
from soco.errors import ConfigError

__all__ = ["Arm", "Budget", "ARMS", "BUDGETS", "READINGS", "SCRATCH", "BASELINE", "length_arm_name",
           "parse_length_arm", "select_arms"]

SCRATCH = "scratch"
BASELINE = "byol_image"  # the paper's image-level baseline (Table 4, row 1)
# full: the paper's protocol (every weight trains). frozen: the backbone and FPN keep their pretrained weights and
# BN statistics; the RPN and heads train, so the reading isolates what the representation holds.
READINGS = ("full", "frozen")


@dataclass(frozen=True)
class Arm:
    """One way to start the detector: a pretraining preset per model size (None: random init)."""

    name: str
    presets: dict[str, str] | None  # model size ('tiny' for tests, 'small', 'r50') -> preset
    note: str
    # Overrides that give the arm the study's detector widths (only methods that pretrain an FPN and box head).
    has_fpn_and_head: bool = False


ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm(SCRATCH, None, "random init of the whole detector"),
    Arm(BASELINE, {"tiny": "byol_image_tiny", "small": "byol_image_small", "r50": "byol_image_r50"},
        "image-level BYOL: backbone only (global pooling of two whole views)"),
    Arm("soco", {"tiny": "soco_tiny", "small": "soco_small", "r50": "soco_r50_fpn"},
        "SoCo: backbone, FPN and box head", has_fpn_and_head=True),
    Arm("scrl", {"tiny": "scrl_tiny", "small": "scrl_small", "r50": "scrl_r50_200ep"}, "SCRL: backbone only"),
    Arm("insloc", {"tiny": "insloc_tiny", "small": "insloc_small", "r50": "insloc_r50_fpn_200ep"},
        "InsLoc: backbone, FPN and box head", has_fpn_and_head=True),
    Arm("detco", {"tiny": "detco_tiny", "small": "detco_small", "r50": "detco_r50_200ep"}, "DetCo: backbone only"),
)}


@config_rules(
    name=ANY_TEXT, model_size=one_of("tiny", "small", "r50"), pretrain_steps=at_least(1),
    extra_lengths=each(at_least(1)), length_readings=list_of(one_of(*READINGS)), pretrain_overrides=list_of(ANY_TEXT),
    head_overrides=list_of(ANY_TEXT), transfer=keywords_of("soco.transfer.finetune:TransferConfig", "transfer"),
    tile_size=at_least(1), seeds=each(at_least(0), min_length=1), arm_overrides=mapping_of(list_of(ANY_TEXT)),
    notes=list_of(ANY_TEXT),
)
@dataclass(frozen=True)
class Budget:
    """Everything every arm shares: pretraining length and size, the detector, the fine-tuning schedule."""

    name: str
    model_size: str  # which preset of each arm ('small' or 'r50')
    pretrain_steps: int  # the main pretraining length
    # SoCo pretrained to these other lengths too (each a full run with its own schedule): the gain-vs-length curve
    extra_lengths: tuple[int, ...]
    length_readings: tuple[str, ...]  # the readings the extra lengths are fine-tuned with
    pretrain_overrides: tuple[str, ...]  # applied to every pretrained arm (batch, warm-up, views)
    head_overrides: tuple[str, ...]  # arms with FPN and head: the detector's widths
    transfer: dict  # TransferConfig keywords (widths included, so a backbone-only arm gets the same detector)
    tile_size: int  # the default data: DeepForest cut into tiles of this size (native resolution)
    seeds: tuple[int, ...] = (0, 1, 2)
    # arm -> overrides of that arm alone, for what must scale with the data rather than the model (queue lengths)
    arm_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default_factory=tuple)


BUDGETS: dict[str, Budget] = {budget.name: budget for budget in (
    Budget(
        name="cpu",
        model_size="small",
        pretrain_steps=300,
        extra_lengths=(75, 150),
        length_readings=("frozen",),
        pretrain_overrides=("train.batch_size=16", "optim.warmup_epochs=1", "train.checkpoint_every=50"),
        head_overrides=("method.model.fpn_channels=64", "method.model.head_conv_channels=64",
                        "method.model.head_fc_dim=256"),
        transfer=dict(depth=18, epochs=9, batch_size=4, min_size=200, max_size=200, fpn_channels=64,
                      box_head_convs=[64, 64, 64, 64], box_head_fcs=[256], rpn_post_nms_train=150,
                      roi_batch_per_image=32, rpn_post_nms_test=150, eval_every=2),
        tile_size=200,
        # MoCo-style queues shorter than an epoch of the ~300 pretraining images (the presets' 4,096 would hold
        # each image about 14 times, stale copies of a query's own image among its negatives)
        arm_overrides={"insloc": ("method.queue_size=256",), "detco": ("method.queue_size=256",)},
        notes=("pretraining: R18, 96-pixel views, batch 16, on the training tiles and the default photos",
               "fine-tuning: Faster R-CNN R18-FPN (FPN 64, head 4x64 conv + 256 fc; widths chosen by measured "
               "speed, docs/study.md) on 200 px tiles at native resolution, 150/32 RoIs per image, fp32"),
    ),
    Budget(
        name="gpu",
        model_size="r50",
        pretrain_steps=3000,
        extra_lengths=(750, 1500),
        length_readings=("full", "frozen"),
        pretrain_overrides=("train.batch_size=64", "optim.warmup_epochs=5", "train.checkpoint_every=500"),
        head_overrides=(),
        transfer=dict(depth=50, epochs=24, batch_size=4, min_size=400, max_size=400, eval_every=2),
        tile_size=400,
        notes=("the paper's R50-FPN at 224/224/112 views, batch 64; Faster R-CNN R50-FPN at 400 px",),
    ),
)}

_LENGTH_SEPARATOR = "@"


def length_arm_name(arm: str, steps: int) -> str:
    """The name of an arm pretrained to another length than the budget's: 'soco@75'."""
    return f"{arm}{_LENGTH_SEPARATOR}{steps}"


def parse_length_arm(name: str) -> tuple[str, int | None]:
    """('soco', 75) for 'soco@75'; (name, None) for a plain arm."""
    base, separator, steps = name.partition(_LENGTH_SEPARATOR)
    return (base, int(steps)) if separator and steps.isdigit() else (name, None)


def select_arms(names: list[str] | None, budget: Budget) -> list[str]:
    """The arm names to run (all, with SoCo's extra lengths, by default); ConfigError naming an unknown one."""
    every = [*ARMS, *(length_arm_name("soco", steps) for steps in budget.extra_lengths)]
    if not names:
        return every
    for name in names:
        base, steps = parse_length_arm(name)
        if base not in ARMS or (steps is not None and (base == SCRATCH or steps < 1)):
            raise ConfigError(f"--arms: unknown arm {name!r} (valid: {', '.join(every)}; any arm@STEPS)")
    # an arm asked for at the budget's own length is the plain arm (one run, not two)
    plain = [base if steps == budget.pretrain_steps else name
             for name, (base, steps) in ((n, parse_length_arm(n)) for n in names)]
    return list(dict.fromkeys(plain))
