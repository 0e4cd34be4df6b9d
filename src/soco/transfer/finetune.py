"""Fine-tuning a detector on a COCO-format set (the paper's recipe scaled to the data), resumable, then COCO AP.

`finetune` runs in phases, as `soco.engine.trainer.pretrain` does: `_set_up` (folder, data, the checkpoint to
resume compared, detector and optimiser), `_resume`, `_start` (DDP, what trains and in which precision),
`_train_epochs` (`_train_epoch` then `_end_epoch`: evaluation when due, checkpoint) and `_finish` (metrics.json).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import soco
from soco.config.loading import apply_overrides as apply_config_overrides
from soco.config.loading import dataclass_keys, parse_override
from soco.config.validation import (
    FRACTION, MAX_IMAGE_SIDE, POSITIVE, PROBABILITY, SEED, Range, at_least, between, config_rules, each, one_of,
)
from soco.config.validation import validate_section
from soco.data.batch_drawing import save_figure
from soco.engine.allocator import keep_freed_memory
from soco.engine.checkpoint import compare_settings, load_checkpoint, restore_training, save_checkpoint
from soco.engine.distributed import DistributedContext, init_distributed
from soco.engine.rng import rng_state
from soco.engine.run_setup import data_parallel, precision_line, refuse_a_second_run, run_folder_lock, seed_run
from soco.engine.step import resolve_precision
from soco.errors import ConfigError, SocoError
from soco.files import atomic_write_text
from soco.models.backbone import RESNET_BUILDERS
from soco.run_folder import mark_run_folder
from soco.transfer.architectures import ARCHITECTURES, TWO_STAGE
from soco.labelled.coco import CocoDetection, check_same_categories, collate, has_masks, plain_target
from soco.transfer.detector import build_detector, convert_sync_bn, describe, load_pretrained
from soco.transfer.evaluate import coco_evaluate, detections_to_coco, summary_line
from soco.transfer.inputs import changed_input, input_fingerprint
from soco.transfer.weights import check_depth, detector_widths, read_weights

__all__ = [
    "TransferConfig",
    "TransferDiverged",
    "apply_overrides",
    "validate_config",
    "lr_factor",
    "finetune",
    "predict",
    "draw_predictions",
    "detector_options",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "PICTURE_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
PICTURE_NAME = "predictions.png"
REFERENCE_BATCH = 16  # the batch at which the paper's lr 0.02 is given
TRANSFER_PREFIX = "transfer"  # the section name an override may carry, and the key prefix of its errors
FREEZE_CHOICES = ("none", "backbone")
DEVICES = ("auto", "cpu", "cuda")
MIN_IMAGE_SIDE = 32  # the detector's resize: the FPN's coarsest level needs a few pixels


@config_rules(
    model=one_of("auto", *ARCHITECTURES), depth=one_of(*sorted(RESNET_BUILDERS)),
    min_size=between(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE), max_size=between(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE),
    epochs=at_least(1), batch_size=at_least(1), base_lr=POSITIVE, lr=at_least(0.0),
    momentum=Range(0.0, 1.0, high_open=True), weight_decay=at_least(0.0), weight_decay_norm=at_least(0.0),
    warmup_fraction=Range(0.0, 1.0, high_open=True), warmup_factor=FRACTION, steps=each(FRACTION), gamma=FRACTION,
    flip_prob=PROBABILITY, workers=at_least(0), eval_every=at_least(0), eval_batch_size=at_least(1),
    detections_per_img=at_least(1), fpn_channels=at_least(0), box_head_convs=each(at_least(1)),
    box_head_fcs=each(at_least(1)), freeze=one_of(*FREEZE_CHOICES), rpn_pre_nms_train=at_least(1),
    rpn_post_nms_train=at_least(1), rpn_pre_nms_test=at_least(1), rpn_post_nms_test=at_least(1),
    roi_batch_per_image=at_least(1), seed=SEED, device=one_of(*DEVICES), picture_images=at_least(0),
    picture_score=Range(),
)
@dataclass
class TransferConfig:
    """Fine-tuning settings; the defaults suit 400x400 tiles (e.g. DeepForest) on a CPU."""

    # faster_rcnn, mask_rcnn, faster_rcnn_c4, retinanet, fcos (docs/transfer.md), or auto: mask_rcnn when the
    # training annotations have masks, else faster_rcnn
    model: str = "auto"
    depth: int = 50  # ResNet depth of the backbone: 18, 34, 50, 101, 152
    min_size: int = 400  # the detector's resize: shorter side to min_size ...
    max_size: int = 667  # ... unless the longer side would exceed max_size (800/1333 ratio)
    epochs: int = 24
    batch_size: int = 4  # images per process and step
    base_lr: float = 0.02  # lr at a total batch of 16 (the paper's); scaled linearly with the batch
    lr: float = 0.0  # if > 0, used as is instead of the scaled base_lr
    momentum: float = 0.9
    weight_decay: float = 2.5e-5
    weight_decay_norm: float = 0.0  # BN weights and biases (Detectron2's default)
    warmup_fraction: float = 0.05  # linear warm-up over this share of the iterations (at least one)
    warmup_factor: float = 0.001  # the warm-up starts at lr * warmup_factor
    steps: list[float] = field(default_factory=lambda: [2.0 / 3.0, 8.0 / 9.0])  # lr x gamma at these shares
    gamma: float = 0.1
    flip_prob: float = 0.5  # horizontal flip during training
    workers: int = 0  # data-loader processes (0: load in the training process)
    eval_every: int = 0  # also evaluate every N epochs (0: only after training)
    eval_batch_size: int = 4
    detections_per_img: int = 100
    # Widths of the FPN and the 4conv1fc box head. 0 / empty: the weights' widths (a pretraining file may have its
    # own, weights.detector_widths), else torchvision's 256 / 4x256 / 1024. Set them to compare arms whose files
    # hold different parts (a backbone-only file next to a backbone+FPN+head file) on one detector.
    fpn_channels: int = 0
    box_head_convs: list[int] = field(default_factory=list)
    box_head_fcs: list[int] = field(default_factory=list)
    # none: every weight trains. backbone: the ResNet and the FPN (the detector's `backbone` module) keep their
    # initial weights and BN statistics; the RPN and the heads train (a reading of what the representation holds).
    freeze: str = "none"
    # Proposal and RoI sampling of the two-stage detectors (torchvision's and Detectron2's defaults; retinanet
    # and fcos have neither). The 4conv1fc head costs about 0.12 GFLOP per RoI forward, so on a CPU these
    # numbers, not the backbone, set the speed.
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    roi_batch_per_image: int = 512
    seed: int = 0
    device: str = "auto"  # auto, cpu or cuda
    sync_bn: bool = True  # SyncBatchNorm when several GPU processes train together
    picture_images: int = 4  # validation images drawn in predictions.png
    picture_score: float = 0.5  # predictions drawn from this score up

    def check_values(self) -> None:
        """The resize's bounds in order and the lr steps increasing (each key's own range is in the rules above)."""
        if self.max_size < self.min_size:
            raise ConfigError(f"{TRANSFER_PREFIX}.max_size: must be at least {TRANSFER_PREFIX}.min_size "
                              f"({self.min_size}), not {self.max_size}")
        if list(self.steps) != sorted(self.steps):
            raise ConfigError(f"{TRANSFER_PREFIX}.steps: must be increasing shares of training in (0, 1], "
                              f"not {list(self.steps)}")


# Settings that change the trained weights: a resume must not change them.
_RESUME_KEYS = ("model", "depth", "min_size", "max_size", "epochs", "batch_size", "base_lr", "lr", "momentum",
                "weight_decay", "weight_decay_norm", "warmup_fraction", "warmup_factor", "steps", "gamma",
                "flip_prob", "rpn_pre_nms_train", "rpn_post_nms_train", "roi_batch_per_image", "seed", "fpn_channels",
                "box_head_convs", "box_head_fcs", "freeze")


class TransferDiverged(SocoError):
    """The fine-tuning loss became NaN or infinite."""


def apply_overrides(config: TransferConfig, overrides: list[str] | tuple[str, ...]) -> TransferConfig:
    """A copy of config with 'key=value' overrides (YAML values; 'transfer.' prefix allowed), strictly checked."""
    valid = dataclass_keys(TransferConfig)
    for text in overrides:
        path, _ = parse_override(text)
        name = ".".join(path[1:] if path[0] == TRANSFER_PREFIX and len(path) > 1 else path)
        if name not in valid:
            # Checked here rather than left to the shared loader, whose message would name the key as
            # 'transfer.<key>': the CLI takes bare keys, so the hint names them the way they are typed.
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown transfer key '{name}'{hint} (valid: {', '.join(valid)})")
    return apply_config_overrides(config, overrides, prefix=TRANSFER_PREFIX)  # checked by its rules as it is built


def validate_config(config: TransferConfig) -> None:
    """ConfigError naming the first setting that breaks its rule (`transfer.KEY: ...`), for a config built in Python."""
    validate_section(config, TRANSFER_PREFIX)


def lr_factor(iteration: int, warmup: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """Multiplier of the lr at an iteration: linear warm-up from warmup_factor, then x gamma at each milestone."""
    factor = gamma ** sum(1 for m in milestones if iteration >= m)
    if iteration < warmup:
        alpha = iteration / warmup
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


@dataclass
class _Plan:
    """Numbers derived from the config and the data: iterations, lr, milestones."""

    world_size: int
    iters_per_epoch: int
    total_iters: int
    lr: float
    warmup_iters: int
    milestones: list[int]


def _plan(config: TransferConfig, train_images: int, world_size: int) -> _Plan:
    total_batch = config.batch_size * world_size
    iters_per_epoch = max(1, math.ceil(train_images / total_batch))
    total = iters_per_epoch * config.epochs
    lr = config.lr if config.lr > 0 else config.base_lr * total_batch / REFERENCE_BATCH
    warmup = max(1, round(config.warmup_fraction * total)) if config.warmup_fraction > 0 else 0
    milestones = [round(share * total) for share in config.steps]
    return _Plan(world_size, iters_per_epoch, total, lr, warmup, milestones)


def chosen_widths(config: TransferConfig, from_weights: dict, weights: str | Path | None) -> dict:
    """build_detector width keywords: the weights' widths, with the config's where set (they must agree)."""
    widths = dict(from_weights)
    asked = {"fpn_channels": config.fpn_channels or None, "box_head_convs": list(config.box_head_convs) or None,
             "box_head_fcs": list(config.box_head_fcs) or None}
    for key, value in asked.items():
        if value is None:
            continue
        if key in widths and widths[key] != value:
            raise ConfigError(f"transfer settings: {key}={value}, but {weights} holds {key}={widths[key]}; "
                              f"leave {key} unset to take the file's")
        widths[key] = value
    return widths


def freeze_backbone(model: nn.Module) -> int:
    """Stop training the detector's backbone module (ResNet + FPN): no gradients, BN in eval; returns tensors frozen."""
    frozen = 0
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
        frozen += 1
    model.backbone.eval()
    return frozen


def _param_groups(model: nn.Module, config: TransferConfig) -> list[dict]:
    """Norm-layer parameters get weight_decay_norm, all others weight_decay."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    norm = [p for p in model.parameters() if p.requires_grad and id(p) in norm_ids]
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in norm_ids]
    return [{"params": other, "weight_decay": config.weight_decay},
            {"params": norm, "weight_decay": config.weight_decay_norm}]


def _epoch_batches(n: int, batch: int, seed: int, epoch: int, rank: int, world_size: int) -> list[list[int]]:
    """This process's batches of one epoch: a permutation drawn from (seed, epoch), cut into global batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    global_batch = batch * world_size
    if world_size > 1 and len(order) % global_batch:
        # Every process must take part in every step (DDP), so the last global batch is topped up.
        order += order[: global_batch - len(order) % global_batch]
    batches = []
    for start in range(0, len(order), global_batch):
        chunk = order[start:start + global_batch]
        batches.append(chunk[rank::world_size])
    return batches


def detector_options(config: TransferConfig, model: str = "faster_rcnn") -> dict:
    """torchvision keyword arguments of the proposal and RoI sampling settings (none for a one-stage detector)."""
    if model not in TWO_STAGE:
        return {}
    return {
        "rpn_pre_nms_top_n_train": config.rpn_pre_nms_train, "rpn_post_nms_top_n_train": config.rpn_post_nms_train,
        "rpn_pre_nms_top_n_test": config.rpn_pre_nms_test, "rpn_post_nms_top_n_test": config.rpn_post_nms_test,
        "box_batch_size_per_image": config.roi_batch_per_image,
    }


@torch.no_grad()
def predict(model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 4,
            progress: bool = False) -> dict[int, dict]:
    """Detector outputs (on the CPU) for every image of a dataset, keyed by COCO image id."""
    from tqdm.auto import tqdm

    model.eval()
    outputs: dict[int, dict] = {}
    indices = list(range(len(dataset)))
    with tqdm(total=len(indices), unit="img", desc="evaluate", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(indices), batch_size):
            batch = [dataset[i] for i in indices[start:start + batch_size]]
            images = [image.as_subclass(torch.Tensor).to(device) for image, _ in batch]
            for (_, target), output in zip(batch, model(images)):
                outputs[int(target["image_id"])] = {k: v.cpu() for k, v in output.items()}
            bar.update(len(batch))
    return outputs


def evaluate_outputs(dataset: CocoDetection, outputs: dict[int, dict], masks: bool) -> dict[str, dict]:
    """COCO metrics of predictions on a dataset: {'bbox': {...}} plus {'segm': {...}} for masks."""
    detections = []
    for image_id, output in outputs.items():
        detections += detections_to_coco(image_id, output, dataset.label_to_category, masks=masks)
    metrics = {"bbox": coco_evaluate(dataset.data, [{k: v for k, v in d.items() if k != "segmentation"}
                                                    for d in detections], "bbox")}
    if masks:
        metrics["segm"] = coco_evaluate(dataset.data, detections, "segm")
    return metrics


def draw_predictions(dataset: CocoDetection, outputs: dict[int, dict], path: str | Path, count: int = 4,
                     min_score: float = 0.5) -> Path | None:
    """A PNG of `count` validation images: ground truth in green, predictions (score >= min_score) in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    # Images with objects first: an empty picture says little about the detector.
    chosen = [i for i in range(len(dataset)) if dataset.annotations[dataset.image_id(i)]][:count]
    chosen += [i for i in range(len(dataset)) if i not in chosen][: count - len(chosen)]
    if not chosen:
        return None
    figure, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 4.6), squeeze=False)
    for axis, index in zip(axes[0], chosen):
        image, target = dataset[index]
        axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        for x1, y1, x2, y2 in target["boxes"].as_subclass(torch.Tensor).tolist():
            axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.2))
        output = outputs.get(dataset.image_id(index))
        shown = 0
        if output is not None:
            for box, score in zip(output["boxes"].tolist(), output["scores"].tolist()):
                if score < min_score:
                    continue
                x1, y1, x2, y2 = box
                axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red",
                                         linewidth=1.0, linestyle="--"))
                axis.text(x1, y1, f"{score:.2f}", color="red", fontsize=6, va="bottom")
                shown += 1
        name = Path(dataset.images[index]["file_name"]).name
        axis.set_title(f"{name}\n{len(target['boxes'])} true (green), {shown} predicted (red)", fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    figure.set_dpi(110)
    return save_figure(figure, path)


# TransferConfig has no precision key: detectors fine-tune in fp32, the recipe the study's readings were measured in.
FINETUNE_PRECISION = "fp32"


@dataclass
class _Data:
    """The training and validation sets of a fine-tuning run and the detector they call for."""

    train_set: CocoDetection
    val_set: CocoDetection
    architecture: str
    with_masks: bool


@dataclass
class _Detector:
    """The detector to fine-tune, with how it was made: its widths and what its starting weights loaded."""

    model: nn.Module
    widths: dict
    weights_report: dict | None


@dataclass
class _FineTuning:
    """What the phases of one fine-tuning call share; `epoch` and `history` move as it trains."""

    config: TransferConfig
    out_dir: Path
    context: DistributedContext
    data: _Data
    plan: _Plan
    settings: dict  # the config as saved in the checkpoint and metrics.json
    weights_id: str  # the absolute path of the starting weights, or "none": what a resume must start from
    inputs: dict  # the input files' fingerprint (transfer.inputs): what a resume or a study's reuse must match
    state: dict | None  # the checkpoint resumed
    detector: _Detector
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: str
    trained: nn.Module | None = None  # the detector, or DDP around it
    epoch: int = 0  # epochs done
    history: list = field(default_factory=list)  # one record per epoch done

    @property
    def checkpoint_path(self) -> Path:
        """checkpoint.pt of the run folder."""
        return self.out_dir / CHECKPOINT_NAME


def finetune(
    config: TransferConfig,
    train_annotations: str | Path,
    train_images: str | Path,
    val_annotations: str | Path,
    val_images: str | Path,
    out_dir: str | Path,
    weights: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune and evaluate; writes checkpoint.pt (each epoch), metrics.json and predictions.png in out_dir.

    `weights`: a torchvision-keyed state dict (None: from scratch). `resume` continues the run in out_dir.
    `stop_after_epochs` ends this call after that many epochs (the checkpoint lets a later call go on);
    metrics.json is then written without final AP. Returns the metrics dict.
    """
    keep_freed_memory()  # each iteration reuses the last one's memory (see engine/allocator.py)
    started = time.perf_counter()
    with ExitStack() as held:  # the run folder's lock, from the set-up to the end, whatever ends the run
        run = _set_up(config, (train_annotations, train_images, val_annotations, val_images), Path(out_dir), weights,
                      resume, log, held)
        _resume(run, resume, log)
        _start(run, log)
        last_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, run.epoch + stop_after_epochs)
        _train_epochs(run, last_epoch, progress, log)
        return _finish(run, weights, progress, log, started)


def _set_up(config: TransferConfig, files: tuple[str | Path, ...], out_dir: Path, weights: str | Path | None,
            resume: bool, log: Callable[[str], None], held: ExitStack) -> _FineTuning:
    """Check and lock the folder (held until `held` closes), load the data, read and compare the checkpoint to
    resume, build detector and optimiser."""
    context = init_distributed(config.device, setting="transfer.device")
    checkpoint_path = out_dir / CHECKPOINT_NAME
    # Refuses a file, an image folder, another kind of run's folder; the lock leaves nothing behind if the set-up
    # fails: a new folder is claimed once the data has loaded.
    held.enter_context(run_folder_lock(out_dir, "transfer", "soco transfer", context))
    refuse_a_second_run(out_dir, f"a fine-tuning run ({CHECKPOINT_NAME})", checkpoint_path.exists(), resume)
    data = _load_data(config, *files)
    mark_run_folder(out_dir, "transfer")  # only now: bad data leaves no folder behind
    plan = _plan(config, len(data.train_set), context.world_size)
    weights_id = str(Path(weights).expanduser().resolve()) if weights is not None else "none"
    inputs = _run_inputs(files, data, weights)
    state = load_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    if state is not None:
        _check_same_run(state, checkpoint_path, config, plan, data.architecture, weights_id, inputs, log)
    detector = _build_detector(config, data, state, weights, context, log)
    optimizer = torch.optim.SGD(_param_groups(detector.model, config), lr=plan.lr, momentum=config.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: lr_factor(it, plan.warmup_iters, config.warmup_factor, plan.milestones, config.gamma),
    )
    precision = resolve_precision(FINETUNE_PRECISION, context.device)
    return _FineTuning(config, out_dir, context, data, plan, dataclasses.asdict(config), weights_id, inputs, state,
                       detector, optimizer, scheduler, precision)


def _run_inputs(files: tuple[str | Path, ...], data: _Data, weights: str | Path | None) -> dict:
    """The input fingerprint (`transfer.inputs`) of a run over these files, for its checkpoint and metrics.json."""
    train_annotations, train_images, val_annotations, val_images = files
    return input_fingerprint(train_annotations, train_images, [i["file_name"] for i in data.train_set.images],
                             val_annotations, val_images, [i["file_name"] for i in data.val_set.images], weights)


def _load_data(config: TransferConfig, train_annotations: str | Path, train_images: str | Path,
               val_annotations: str | Path, val_images: str | Path) -> _Data:
    """Both sets, and the architecture: `auto` is mask_rcnn when the training annotations have masks."""
    train_set = CocoDetection(train_annotations, train_images, train=True, flip_prob=config.flip_prob,
                              seed=config.seed)
    masks_available = has_masks(train_set.data)
    architecture = config.model
    if architecture == "auto":
        architecture = "mask_rcnn" if masks_available else "faster_rcnn"
    if architecture == "mask_rcnn" and not masks_available:
        raise SocoError(f"--model mask_rcnn needs masks, and {train_set.annotation_file} has no 'segmentation'")
    with_masks = architecture == "mask_rcnn"
    train_set.masks = with_masks
    val_set = CocoDetection(val_annotations, val_images, train=False, masks=with_masks,
                            categories=train_set.category_ids)
    check_same_categories(train_set, val_set)
    if len(train_set) == 0:
        raise SocoError(f"{train_set.annotation_file} lists no image")
    if len(val_set) == 0:
        raise SocoError(f"{val_set.annotation_file} lists no image")
    return _Data(train_set, val_set, architecture, with_masks)


def _check_same_run(state: dict, checkpoint_path: Path, config: TransferConfig, plan: _Plan, architecture: str,
                     weights_id: str, inputs: dict, log: Callable[[str], None]) -> None:
    """SocoError when the checkpoint was made with other settings, data or starting weights than this call's."""
    if state.get("weights") != weights_id:
        # The metrics would name weights that did not start this run.
        raise SocoError(f"{checkpoint_path} started from weights {state.get('weights')}, not {weights_id}")
    if "inputs" not in state:
        # Written before inputs were fingerprinted: refusing would strand every older run.
        log(f"{checkpoint_path} records no fingerprint of its input files (an older soco): the annotations, images "
            "and weights could not be checked against it")
    elif (change := changed_input(state["inputs"], inputs)) is not None:
        raise SocoError(f"{checkpoint_path} cannot be resumed: {change}; resume with the files it was made with, "
                        "or start a new run in another --out")
    settings = dataclasses.asdict(config)
    # A key an older checkpoint lacks had its default.
    recorded = {**dataclasses.asdict(TransferConfig()), **state["config"]}
    # The keys that must match first, so that the message names them in _RESUME_KEYS' order; every other key may change.
    current = {**{key: settings[key] for key in _RESUME_KEYS}, **settings}
    refused, _ = compare_settings(recorded, current, [key for key in settings if key not in _RESUME_KEYS])
    changed = [key for key, _, _ in refused]
    if changed or state.get("total_iters") != plan.total_iters or state.get("model_type") != architecture:
        raise SocoError(f"{checkpoint_path} was made with other settings ({', '.join(changed) or 'data size'} "
                        "differ): resume with the same data and settings")


def _build_detector(config: TransferConfig, data: _Data, state: dict | None, weights: str | Path | None,
                    context: DistributedContext, log: Callable[[str], None]) -> _Detector:
    """The detector on its device, seeded, with the starting weights loaded (a resume loads its own later)."""
    pretrained = None
    if state is not None:
        widths = state.get("detector_widths") or {}  # the run's widths; its checkpoint replaces every weight
    elif weights is not None:
        pretrained = read_weights(weights)
        check_depth(pretrained, config.depth, weights)
        widths = detector_widths(pretrained)  # a pretraining run's FPN and head widths, so every tensor fits
    else:
        widths = {}
    if state is None:
        widths = chosen_widths(config, widths, weights)
    seed_run(config.seed)
    model = build_detector(data.architecture, num_classes=len(data.train_set.category_ids) + 1, depth=config.depth,
                           min_size=config.min_size, max_size=config.max_size,
                           detections_per_img=config.detections_per_img,
                           **widths, **detector_options(config, data.architecture))
    weights_report = None
    if state is not None:
        weights_report = state.get("weights_loaded")
    elif pretrained is not None:
        report = load_pretrained(model, pretrained, name=Path(weights).expanduser())
        weights_report = {"loaded": report.loaded, "random": report.random, "not_loaded": report.not_loaded}
        if context.is_main:
            log(report.line())
    elif context.is_main:
        log("weights: none (training from scratch: random init, zero-init residual BN)")
    if config.freeze == "backbone":
        frozen = freeze_backbone(model)
        if context.is_main:
            log(f"frozen: the backbone and FPN ({frozen} tensors, BN statistics included); the RPN and heads train")
    model.to(context.device)
    if config.sync_bn:
        model = convert_sync_bn(model, context.world_size, context.device)
    return _Detector(model, widths, weights_report)


def _resume(run: _FineTuning, resume: bool, log: Callable[[str], None]) -> None:
    """Load the checkpoint, if any: detector, optimiser, schedule, random states, epochs done and their records."""
    is_main = run.context.is_main
    if run.state is not None:
        restore_training(run.state, {"model": run.detector.model, "optimizer": run.optimizer,
                                     "scheduler": run.scheduler})
        run.epoch, run.history = int(run.state["epoch"]), list(run.state["history"])
        if is_main:
            log(f"resuming {run.out_dir} after epoch {run.epoch} of {run.config.epochs}")
    elif resume and is_main:
        log(f"nothing to resume in {run.out_dir}; starting a new run")


def _start(run: _FineTuning, log: Callable[[str], None]) -> None:
    """Wrap the detector for DDP (after the resume: DDP spreads the main process's weights) and say what trains."""
    config, plan, context, train_set = run.config, run.plan, run.context, run.data.train_set
    run.trained = data_parallel(run.detector.model, context)
    if context.is_main:
        log(f"fine-tuning {describe(run.data.architecture, config.depth)} on {len(train_set)} images "
            f"({train_set.num_boxes()} boxes, {len(train_set.category_ids)} categories); "
            f"{config.epochs} epochs x {plan.iters_per_epoch} iterations of {config.batch_size * plan.world_size} "
            f"images; lr {plan.lr:.4g}, warm-up {plan.warmup_iters} it, decay at {plan.milestones}; "
            f"{context.world_size} process(es) on {context.device}")
        log(precision_line(run.precision))


def _train_epochs(run: _FineTuning, last_epoch: int, progress: bool, log: Callable[[str], None]) -> None:
    """Train the epochs up to `last_epoch`, each ended by its record, its evaluation when due and its checkpoint."""
    from tqdm.auto import tqdm

    bar = tqdm(total=run.plan.total_iters, initial=run.epoch * run.plan.iters_per_epoch, unit="it", desc="transfer",
               disable=not (progress and run.context.is_main), dynamic_ncols=True)
    try:
        while run.epoch < last_epoch:
            epoch_started = time.perf_counter()
            sums, iterations = _train_epoch(run, bar)
            run.epoch += 1
            steps = max(1, iterations)
            record = {"epoch": run.epoch, **{k: v / steps for k, v in sums.items()},
                      "lr": run.scheduler.get_last_lr()[0], "seconds": time.perf_counter() - epoch_started}
            _end_epoch(run, record, log)
    finally:
        bar.close()


def _train_epoch(run: _FineTuning, bar) -> tuple[dict[str, float], int]:
    """One epoch of updates: (each loss summed over its iterations, the epoch's batches on this process)."""
    config, context, model, scheduler = run.config, run.context, run.detector.model, run.scheduler
    run.trained.train()
    if config.freeze == "backbone":
        model.backbone.eval()  # frozen BN keeps its statistics
    train_set = run.data.train_set
    train_set.set_epoch(run.epoch)
    batches = _epoch_batches(len(train_set), config.batch_size, config.seed, run.epoch, context.rank,
                             context.world_size)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=config.workers,
                                         collate_fn=collate, pin_memory=context.device.type == "cuda")
    sums: dict[str, float] = {}
    for iteration, (images, targets) in enumerate(loader):
        images = [image.as_subclass(torch.Tensor).to(context.device) for image in images]
        targets = [plain_target(t, context.device) for t in targets]
        losses = run.trained(images, targets)
        loss = sum(losses.values())
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TransferDiverged(
                f"loss became {value} at epoch {run.epoch + 1}, iteration {iteration + 1} "
                f"(lr {scheduler.get_last_lr()[0]:.4g}); lower the lr. The last good checkpoint is kept: "
                f"{run.checkpoint_path if run.checkpoint_path.exists() else 'none yet'}")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        scheduler.step()
        for name, part in losses.items():
            sums[name] = sums.get(name, 0.0) + float(part.detach())
        sums["loss"] = sums.get("loss", 0.0) + value
        bar.update(1)
        bar.set_postfix(epoch=run.epoch + 1, loss=f"{value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
    return sums, len(batches)


def _end_epoch(run: _FineTuning, record: dict, log: Callable[[str], None]) -> None:
    """The epoch's evaluation when due, its record in the history, the checkpoint, and the processes' meeting."""
    config, context, data = run.config, run.context, run.data
    if config.eval_every and run.epoch % config.eval_every == 0 and run.epoch < config.epochs and context.is_main:
        record["val"] = evaluate_outputs(data.val_set, predict(run.detector.model, data.val_set, context.device,
                                                               config.eval_batch_size), data.with_masks)
        log(f"epoch {run.epoch}: loss {record['loss']:.4f}; val bbox {summary_line(record['val']['bbox'])}")
    run.history.append(record)
    if context.is_main:
        save_checkpoint(_checkpoint_state(run), run.checkpoint_path)
    if context.is_distributed:
        torch.distributed.barrier()


def _checkpoint_state(run: _FineTuning) -> dict:
    """Everything a fine-tuning resume needs, after `run.epoch` epochs."""
    detector = run.detector
    return {
        "epoch": run.epoch, "model": detector.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "rng": rng_state(), "history": run.history,
        "config": run.settings, "total_iters": run.plan.total_iters, "model_type": run.data.architecture,
        "weights": run.weights_id, "inputs": run.inputs, "weights_loaded": detector.weights_report, "detector_widths": detector.widths,
        "soco_version": soco.__version__,
    }


def _finish(run: _FineTuning, weights: str | Path | None, progress: bool, log: Callable[[str], None],
            started: float) -> dict:
    """The metrics of the call; once every epoch is done, the final evaluation and picture; metrics.json."""
    config, context, data = run.config, run.context, run.data
    finished = run.epoch >= config.epochs
    metrics: dict[str, Any] = {
        "finished": finished,
        "epochs_done": run.epoch,
        "model": data.architecture,
        "weights": str(weights) if weights is not None else "none",
        "weights_loaded": run.detector.weights_report,
        "seed": config.seed,
        "settings": run.settings,
        "inputs": run.inputs,
        "plan": dataclasses.asdict(run.plan),
        "train": {"annotations": str(data.train_set.annotation_file), "images": len(data.train_set),
                  "boxes": data.train_set.num_boxes()},
        "val": {"annotations": str(data.val_set.annotation_file), "images": len(data.val_set),
                "boxes": data.val_set.num_boxes()},
        "categories": {str(cid): name for cid, name in data.val_set.category_names.items()},
        "history": run.history,
        "device": str(context.device),
        "precision": run.precision,
        "world_size": context.world_size,
        "versions": {"soco": soco.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if context.is_main:
        if finished:
            metrics.update(_final_evaluation(run, progress, log))
        else:
            log(f"stopped after epoch {run.epoch} of {config.epochs}; continue with --resume")
        metrics["seconds_this_call"] = time.perf_counter() - started
        run.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out_dir / METRICS_NAME, json.dumps(metrics, indent=1) + "\n")
    if context.is_distributed:
        torch.distributed.barrier()
    return metrics


def _final_evaluation(run: _FineTuning, progress: bool, log: Callable[[str], None]) -> dict:
    """COCO AP of the fine-tuned detector on the validation set, and predictions.png when asked for."""
    config, data = run.config, run.data
    outputs = predict(run.detector.model, data.val_set, run.context.device, config.eval_batch_size,
                      progress=progress)
    evaluation = evaluate_outputs(data.val_set, outputs, data.with_masks)
    if config.picture_images:
        picture = draw_predictions(data.val_set, outputs, run.out_dir / PICTURE_NAME, config.picture_images,
                                   config.picture_score)
        evaluation["picture"] = str(picture) if picture else None
    log(f"val bbox: {summary_line(evaluation['bbox'])}"
        + (f"; segm: {summary_line(evaluation['segm'])}" if "segm" in evaluation else ""))
    return evaluation
