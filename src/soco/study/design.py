"""The study's arms, readings and budgets: what each arm pretrains with and how every arm is fine-tuned.

The arms are the methods' own (each Method class declares its `study_arms`, read through the registry), and
the study adds its scratch arm, which pretrains nothing; a method added to the registry is an arm here at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from soco.config.loading import keywords_of
from soco.config.validation import ANY_TEXT, SEED, at_least, config_rules, each, list_of, one_of
from soco.declarations import StudyArm
from soco.errors import ConfigError

__all__ = ["Budget", "BUDGETS", "READINGS", "SCRATCH", "SCRATCH_ARM", "BASELINE", "LENGTHS_ARM", "arms",
           "arm_names", "length_arm_name", "parse_length_arm", "select_arms"]

SCRATCH = "scratch"
SCRATCH_ARM = StudyArm(SCRATCH, "random init of the whole detector", order=0)
BASELINE = "byol_image"  # the paper's image-level baseline (Table 4, row 1), SoCo's arm of whole images
LENGTHS_ARM = "soco"  # the arm pretrained to the budget's extra lengths too (the gain-vs-length curve)
# full: the paper's protocol (every weight trains). frozen: the backbone and FPN keep their pretrained weights and
# BN statistics; the RPN and heads train, so the reading isolates what the representation holds.
READINGS = ("full", "frozen")


def arms() -> dict[str, StudyArm]:
    """Every arm by name, in the study's order: scratch, then the registered methods' arms by their `order`."""
    from soco.registry import study_arms

    declared = study_arms()
    if any(arm.name == SCRATCH for arm in declared):
        raise TypeError(f"study arm {SCRATCH!r} is the study's own; a method cannot declare it")
    return {arm.name: arm for arm in (SCRATCH_ARM, *declared)}


def arm_names() -> list[str]:
    """The names of every arm, in the study's order (scratch first)."""
    return list(arms())


@config_rules(
    name=ANY_TEXT, model_size=one_of("tiny", "small", "r50"), pretrain_steps=at_least(1),
    extra_lengths=each(at_least(1)), length_readings=list_of(one_of(*READINGS)), pretrain_overrides=list_of(ANY_TEXT),
    head_overrides=list_of(ANY_TEXT), transfer=keywords_of("soco.transfer.finetune:TransferConfig", "transfer"),
    tile_size=at_least(1), seeds=each(SEED, min_length=1),
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
    known = arm_names()
    every = [*known, *(length_arm_name(LENGTHS_ARM, steps) for steps in budget.extra_lengths)]
    if not names:
        return every
    for name in names:
        base, steps = parse_length_arm(name)
        if base not in known or (steps is not None and (base == SCRATCH or steps < 1)):
            raise ConfigError(f"--arms: unknown arm {name!r} (valid: {', '.join(every)}; any arm@STEPS)")
    # an arm asked for at the budget's own length is the plain arm (one run, not two)
    plain = [base if steps == budget.pretrain_steps else name
             for name, (base, steps) in ((n, parse_length_arm(n)) for n in names)]
    return list(dict.fromkeys(plain))
