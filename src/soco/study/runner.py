"""Running the study: data, one proposal store, each arm's pretraining and export, each fine-tuning; all resumable.

Layout of a study folder (every pretraining and fine-tuning run resumes where a stop left it, and a finished one is
read, not rerun; the export and the probe, which take seconds, are redone by each call; one call at a time):

    pretrain_images/   links to the training images of the labelled set, plus the extra unlabeled folders
    proposals/         one proposal store for every arm that samples proposals
    pretrain/ARM/      a `soco pretrain` run folder per arm (exported/ holds its torchvision file)
    finetune/READING/ARM/seedN/   a `soco transfer` run folder per reading, arm and seed
    probe.json         the box-feature probe of every pretrained arm and of a random init
    timings.json       wall seconds spent on each piece, summed over the calls that worked on it
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from soco.errors import DataError
from soco.files import atomic_write_text, folder_lock
from soco.study.design import READINGS, SCRATCH, Budget, arms, parse_length_arm

__all__ = ["StudyData", "default_data", "pretraining_folder", "run_study", "finetune_dir",
           "pretraining_settings", "PROBE_NAME", "TIMINGS_NAME", "STUDY_MARKER", "RANDOM_INIT"]

PROBE_NAME = "probe.json"
TIMINGS_NAME = "timings.json"
STUDY_MARKER = "soco-study.json"
PROBE_STAGES = ("c4", "c5")
RANDOM_INIT = "random init"  # the probe's backbone of untrained weights, beside every pretrained arm's


@dataclass
class StudyData:
    """The labelled set the detectors are fine-tuned and evaluated on, and the extra unlabeled folders."""

    train: Path
    train_images: Path
    val: Path
    val_images: Path
    unlabeled: list[Path] = field(default_factory=list)  # pretraining images besides the training images
    name: str = "user data"


def default_data(budget: Budget, progress: bool = True) -> StudyData:
    """DeepForest cut into the budget's tiles (train / val split by whole regions), plus the default photos."""
    from soco.labelled.deepforest import deepforest_dir, prepare_deepforest
    from soco.data.default_photos import assemble_photos

    base = deepforest_dir()
    dest = base if budget.tile_size == 400 else base.with_name(f"{base.name}-tiles{budget.tile_size}")
    folder = prepare_deepforest(dest, tile_size=budget.tile_size, quiet=not progress)
    return StudyData(folder / "train.json", folder / "images", folder / "val.json", folder / "images",
                     unlabeled=[assemble_photos(progress=progress)], name=f"DeepForest {budget.tile_size} px tiles")


def describe_data(data: StudyData) -> str:
    """The data in words for the report: the labelled set and what else is pretrained on."""
    if not data.unlabeled:
        return data.name
    from soco.data.default_photos import photos_dir

    default_photos = photos_dir().resolve()
    extra = ["the default photos" if Path(d).expanduser().resolve() == default_photos else str(d)
             for d in data.unlabeled]
    return f"{data.name} + {', '.join(extra)}"


def _train_file_names(annotations: Path) -> list[str]:
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        return [str(image["file_name"]) for image in data["images"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{annotations}: not a readable COCO file ({error})") from error


def pretraining_folder(study_dir: Path, data: StudyData) -> Path:
    """A folder of links to the training images and the unlabeled folders: no validation pixel is pretrained on."""
    folder = study_dir / "pretrain_images"
    labelled = folder / "train"
    labelled.mkdir(parents=True, exist_ok=True)
    for file_name in _train_file_names(data.train):
        source = (data.train_images / file_name).resolve()
        if not source.is_file():
            raise DataError(f"{data.train}: image {file_name} is not in {data.train_images}")
        link = labelled / file_name.replace("/", "__")
        if not link.is_symlink():
            link.symlink_to(source)
    for index, extra in enumerate(data.unlabeled):
        extra = Path(extra).expanduser().resolve()
        if not extra.is_dir():
            raise DataError(f"unlabeled folder {extra} does not exist")
        link = folder / f"unlabeled{index}-{extra.name}"
        if not link.is_symlink():
            link.symlink_to(extra, target_is_directory=True)
    return folder


def finetune_dir(study_dir: Path, reading: str, arm: str, seed: int) -> Path:
    """The fine-tuning run folder of one reading, arm and seed."""
    return study_dir / "finetune" / reading / arm / f"seed{seed}"


class _Timings:
    """Wall seconds per piece of the study, summed over calls and kept in timings.json."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = read_json(path) if path.is_file() else {}

    def add(self, piece: str, seconds: float) -> None:
        self.seconds[piece] = self.seconds.get(piece, 0.0) + seconds
        atomic_write_text(self.path, json.dumps(self.seconds, indent=1, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def timed(self, piece: str):
        """Add the wall time of the block to `piece`, also when the block is interrupted (Ctrl-C)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(piece, time.perf_counter() - started)


def pretraining_settings(arm_name: str, budget: Budget, device: str) -> tuple[str, list[str]]:
    """(preset, overrides) an arm is pretrained with under a budget: the budget's, the head widths, the arm's own."""
    base, steps = parse_length_arm(arm_name)
    arm = arms()[base]
    overrides = [*budget.pretrain_overrides, f"train.steps={steps or budget.pretrain_steps}",
                 f"train.device={device}", *(budget.head_overrides if arm.pretrains_fpn_and_head else ()),
                 *arm.overrides_for(budget.name)]
    return arm.presets.for_size(budget.model_size), overrides


def check_pretraining_configs(arm_names: list[str], budget: Budget, device: str) -> None:
    """Load (and so validate) every pretrained arm's configuration: a bad one is refused before any file is written."""
    for arm_name in arm_names:
        if parse_length_arm(arm_name)[0] != SCRATCH:
            _pretrain_config(arm_name, budget, device)


def _pretrain_config(arm_name: str, budget: Budget, device: str):
    from soco.config.loading import load_config

    return load_config(*pretraining_settings(arm_name, budget, device))


def _pretrain_and_export(arm_name: str, budget: Budget, images: Path, store: Path | None, study_dir: Path,
                         device: str, progress: bool, log: Callable[[str], None]) -> Path:
    """Pretrain one arm (or continue / reuse its run) and export its encoder in the format the arm declares."""
    from soco.engine.trainer import pretrain
    from soco.export import export_checkpoint

    run_dir = study_dir / "pretrain" / arm_name
    exported = run_dir / "exported"
    config = _pretrain_config(arm_name, budget, device)
    summary = pretrain(config, run_dir, images, store, resume=True, progress=progress)
    if summary.steps_this_run:
        log(f"[{arm_name}] pretrained {summary.steps} steps, final loss {summary.final_loss:.3f}, "
            f"{summary.images_per_second:.1f} images/s")
    else:  # a finished run, reused: no step ran now, so no rate was measured
        log(f"[{arm_name}] already pretrained ({summary.steps} steps, final loss {summary.final_loss:.3f})")
    export_format = arms()[parse_length_arm(arm_name)[0]].exports
    return export_checkpoint(run_dir, export_format, exported / f"{export_format}.pt").output


def _check_same_inputs(metrics: dict, metrics_path: Path, weights: Path | None, data: StudyData,
                       log: Callable[[str], None]) -> None:
    """DataError naming the input file that changed since a finished run's metrics.json was written."""
    from soco.transfer.inputs import changed_input, input_fingerprint

    if "inputs" not in metrics:
        # Written before inputs were fingerprinted: refusing would make every older study unreadable.
        log(f"{metrics_path} records no fingerprint of its input files (an older soco): reused unchecked")
        return
    current = input_fingerprint(data.train, data.train_images, _train_file_names(data.train), data.val,
                                data.val_images, _train_file_names(data.val), weights)
    change = changed_input(metrics["inputs"], current)
    if change is not None:
        # Reusing it would average results of two data sets into one row; redoing it would replace a result.
        raise DataError(f"{metrics_path}: {change} since this run finished; choose another --out for the new data, "
                        f"or delete {metrics_path.parent} to redo this run")


def _finetune(arm_name: str, reading: str, seed: int, weights: Path | None, budget: Budget, data: StudyData,
              study_dir: Path, device: str, progress: bool, log: Callable[[str], None] = print) -> dict:
    """Fine-tune one arm with one reading and seed (or read its finished metrics, made from the same files)."""
    from soco.transfer.finetune import METRICS_NAME, TransferConfig, finetune

    out_dir = finetune_dir(study_dir, reading, arm_name, seed)
    metrics_path = out_dir / METRICS_NAME
    if metrics_path.is_file():
        metrics = read_json(metrics_path)
        if metrics.get("finished") and metrics.get("bbox"):
            _check_same_inputs(metrics, metrics_path, weights, data, log)
            return metrics
    config = replace(TransferConfig(**budget.transfer), seed=seed, device=device,
                     freeze="backbone" if reading == "frozen" else "none")
    return finetune(config, data.train, data.train_images, data.val, data.val_images, out_dir, weights=weights,
                    resume=True, progress=progress, log=lambda line: None)


def _probe(weights: dict[str, Path], budget: Budget, data: StudyData, study_dir: Path,
           log: Callable[[str], None]) -> dict:
    """k-NN and linear-probe accuracy of each pretrained arm's backbone and a random init, on the training boxes.

    The training set's boxes, not the validation set's: six times the crops (the probe holds half of the images
    out itself), and pretraining saw those pixels but never their labels.
    """
    from soco.labelled.coco import CocoDetection
    from soco.transfer.probe import pretrained_trunk, probe_backbones
    from soco.transfer.weights import read_weights

    depth = budget.transfer["depth"]
    trunks = {name: pretrained_trunk(depth, 0, read_weights(path), path)[0] for name, path in weights.items()}
    trunks[RANDOM_INIT], _ = pretrained_trunk(depth, 0)
    dataset = CocoDetection(data.train, data.train_images)
    result = {}
    for stage in PROBE_STAGES:
        scores = probe_backbones(trunks, dataset, stage=stage)
        result[stage] = {name: {"knn": score.knn_accuracy, "linear": score.linear_accuracy,
                                "majority": score.majority_accuracy, "test_crops": score.test_crops}
                         for name, score in scores.items()}
        log(f"probe {stage}: " + "; ".join(f"{name} k-NN {100 * s['knn']:.1f}%, linear {100 * s['linear']:.1f}%"
                                           for name, s in result[stage].items()))
    return result


def readings_of(arm_name: str, budget: Budget, readings: list[str]) -> list[str]:
    """The readings an arm is fine-tuned with: all asked for, or the budget's for an extra pretraining length."""
    if parse_length_arm(arm_name)[1] is not None:
        return [r for r in readings if r in budget.length_readings]
    return list(readings)


def run_study(budget: Budget, arms: list[str], seeds: list[int], readings: list[str], data: StudyData,
              study_dir: Path, device: str = "auto", progress: bool | None = None, probe: bool = True,
              log: Callable[[str], None] = print, after_each: Callable[[], None] | None = None) -> None:
    """Pretrain, export and fine-tune every selected arm, seed and reading, resuming whatever was done."""
    progress = sys.stderr.isatty() if progress is None else progress
    unknown = [r for r in readings if r not in READINGS]
    if unknown:
        raise DataError(f"unknown readings {unknown} (valid: {', '.join(READINGS)})")
    study_dir.mkdir(parents=True, exist_ok=True)
    with _study_lock(study_dir):
        check_study_folder(study_dir, study_record(budget, data))
        _run_locked(budget, arms, seeds, readings, data, study_dir, device, progress, probe, log, after_each)


def study_record(budget: Budget, data: StudyData) -> dict:
    """What a study folder is the study of: the budget and every input path, resolved (soco-study.json)."""
    return {"budget": budget.name, "data": describe_data(data), "train": _resolved(data.train),
            "val": _resolved(data.val), "train_images": _resolved(data.train_images),
            "val_images": _resolved(data.val_images), "unlabeled": [_resolved(d) for d in data.unlabeled]}


def _resolved(path: str | Path) -> str:
    """A path as the study folder's marker records it: absolute, links resolved, so one file has one name."""
    return str(Path(path).expanduser().resolve())


# The marker's keys that hold paths; a marker of an older soco may hold them as they were typed.
_PATH_KEYS = ("train", "val", "train_images", "val_images")


def read_json(path: Path) -> dict:
    """A JSON file of the study folder; DataError naming it when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is damaged ({error}); delete it to rebuild it") from error


def check_study_folder(study_dir: Path, record: dict) -> None:
    """Mark an empty folder as this study's; DataError naming the settings that differ in another study's."""
    marker = study_dir / STUDY_MARKER
    if not marker.is_file():
        atomic_write_text(marker, json.dumps(record, indent=1) + "\n")
        return
    earlier = read_json(marker)
    # An older marker's relative train / val paths were typed from this folder's users' working directory, as now.
    earlier = {key: (_resolved(value) if key in _PATH_KEYS and isinstance(value, str) else value)
               for key, value in earlier.items()}
    # A marker of the first version lacks the image paths: those are taken as they are now.
    differ = [key for key in record if key in earlier and earlier[key] != record[key]]
    if differ:
        changes = "; ".join(f"{key}: {earlier[key]} -> {record[key]}" for key in differ)
        raise DataError(f"{study_dir} holds another study ({changes}): choose another --out")
    if earlier != record:
        atomic_write_text(marker, json.dumps(record, indent=1) + "\n")


def _study_lock(study_dir: Path):
    """One call at a time in a study folder (`files.folder_lock`): a second one is refused in one line."""
    return folder_lock(study_dir, "soco study", error=DataError, advice="wait for it to end, or choose another --out")


def uses_proposals(arm_name: str, budget: Budget, device: str) -> bool:
    """Whether an arm's pretraining samples proposals (only those arms are handed the store)."""
    from soco.registry import method_class

    config = _pretrain_config(arm_name, budget, device)
    return method_class(config.method.name).uses_proposals(config.method)


def _run_locked(budget: Budget, arms: list[str], seeds: list[int], readings: list[str], data: StudyData,
                study_dir: Path, device: str, progress: bool, probe: bool, log: Callable[[str], None],
                after_each: Callable[[], None] | None) -> None:
    from soco.data.proposals.pipeline import run_proposals
    from soco.data.proposals.store import is_store

    timings = _Timings(study_dir / TIMINGS_NAME)
    pretrained = [a for a in arms if parse_length_arm(a)[0] != SCRATCH]
    images = pretraining_folder(study_dir, data) if pretrained else None
    store = study_dir / "proposals"
    with_store = {arm: uses_proposals(arm, budget, device) for arm in pretrained}
    if any(with_store.values()) and not is_store(store):
        # one store for every arm that samples proposals: computed with the first one's proposal settings
        first = next(arm for arm, uses in with_store.items() if uses)
        with timings.timed("proposals"):
            summary = run_proposals(images, store, _pretrain_config(first, budget, device).proposals,
                                    progress=progress)
        log(f"proposals: {summary.images} images, {summary.proposals / max(1, summary.images):.1f} kept per image, "
            f"{summary.seconds:.0f} s, into {store}")

    weights: dict[str, Path] = {}
    for arm in arms:
        arm_weights = None
        if arm in pretrained:
            with timings.timed(f"pretrain/{arm}"):
                arm_weights = _pretrain_and_export(arm, budget, images, store if with_store[arm] else None,
                                                   study_dir, device, progress, log)
            weights[arm] = arm_weights
        for seed in seeds:
            for reading in readings_of(arm, budget, readings):
                with timings.timed(f"finetune/{reading}/{arm}/seed{seed}"):
                    metrics = _finetune(arm, reading, seed, arm_weights, budget, data, study_dir, device, progress,
                                        log)
                bbox = metrics["bbox"]
                log(f"[{arm}] {reading} seed {seed}: AP {100 * bbox['AP']:.2f}, AP50 {100 * bbox['AP50']:.2f}")
                if after_each is not None:
                    after_each()
    if probe and weights:
        earlier = read_json(study_dir / PROBE_NAME) if (study_dir / PROBE_NAME).is_file() else {}
        with timings.timed("probe"):
            result = _probe(weights, budget, data, study_dir, log)
        for stage, scores in result.items():
            earlier.setdefault(stage, {}).update(scores)
        atomic_write_text(study_dir / PROBE_NAME, json.dumps(earlier, indent=1) + "\n")
