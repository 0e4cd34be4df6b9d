"""What pretraining buys: SoCo vs whole-image BYOL vs scratch, fine-tuned on DeepForest tiles.

    python benchmarks/transfer_study.py [--budget cpu|gpu] [--seeds 0 1 2] [--out runs/transfer_study]

Every pretrained arm gets the same budget: the same unlabeled images (DeepForest's training tiles plus
the default photos; never a validation pixel), steps, batch and view sizes. (a) is SoCo; (b) is the
paper's image-level BYOL baseline (Table 4, row 1: preset `byol_image_r50`, no FPN, no box head, whole
views, two views, no jitter) at the same depth and view sizes; it exports the backbone only, so its
detector's FPN and heads start from random weights; (c) is SCRL (backbone only, likewise); (d) starts the
whole detector from random weights. Each arm is fine-tuned with every seed on the same split; the table of
AP and AP50 (mean and sample standard deviation over seeds) goes to benchmarks/results/. Finished
pretraining and fine-tuning runs are reused, so a stopped study continues where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import soco  # noqa: F401  (thread settings before torch)
from soco.config.loading import load_config
from soco.data.deepforest import prepare_deepforest, training_pixels_folder
from soco.data.photos import assemble_photos
from soco.data.proposals.pipeline import run_proposals
from soco.data.proposals.store import is_store
from soco.engine.trainer import pretrain
from soco.export import export_checkpoint
from soco.export.formats import UnsupportedLayoutError
from soco.transfer.finetune import TransferConfig, finetune

RESULTS = Path(__file__).resolve().parent / "results"

# The same pretraining budget for both pretrained arms; the GPU budget is the paper's model size.
BUDGETS = {
    "cpu": {
        "preset": "soco_small",  # R18-FPN, views 96/96/48, K=4
        "pretrain": ["train.steps=150", "train.batch_size=16", "optim.warmup_epochs=1"],
        "transfer": dict(depth=18, epochs=8, batch_size=4, min_size=400, max_size=400,
                         rpn_post_nms_train=600, roi_batch_per_image=128, rpn_post_nms_test=300),
    },
    "gpu": {
        "preset": "soco_r50_fpn",
        "pretrain": ["train.steps=3000", "train.batch_size=64", "optim.warmup_epochs=5"],
        "transfer": dict(depth=50, epochs=24, batch_size=4, min_size=400, max_size=667),
    },
}
# arm -> the preset it starts from per budget, before the budget's pretraining overrides; None: scratch
SMALL_R18_FPN_VIEWS_96 = ["method.model.depth=18", "method.model.projector_hidden=1024", "method.views.v1_size=96",
                          "method.views.v2_size=96", "method.views.v3_size=48"]
ARMS = {
    "soco": {"cpu": ("soco_small", []), "gpu": ("soco_r50_fpn", [])},
    "byol_image": {"cpu": ("byol_image_r50", SMALL_R18_FPN_VIEWS_96), "gpu": ("byol_image_r50", [])},
    "scrl": {"cpu": ("scrl_small", []), "gpu": ("scrl_r50_200ep", [])},
    "scratch": None,
}


def pretraining_images(study: Path, deepforest: Path) -> Path:
    """A folder linking DeepForest's training tiles and the default photos (no validation pixel)."""
    folder = study / "pretrain_images"
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("deepforest_train", training_pixels_folder(deepforest)), ("photos", assemble_photos())):
        link = folder / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return folder


def pretrain_arm(name: str, start: tuple[str, list[str]], budget: dict, images: Path, store: Path, study: Path,
                 device: str) -> Path:
    """Pretrain one arm (or reuse its finished run) and export what its encoder holds for torchvision."""
    run_dir = study / "pretrain" / name
    preset, overrides = start
    config = load_config(preset, [*overrides, *budget["pretrain"], f"train.device={device}"])
    summary = pretrain(config, run_dir, images, store, resume=True, progress=sys.stderr.isatty())
    print(f"[{name}] pretrained {summary.steps} steps, final loss {summary.final_loss:.3f}", flush=True)
    try:  # backbone, FPN and box head
        return export_checkpoint(run_dir, "torchvision", run_dir / "exported" / "torchvision.pt").output
    except UnsupportedLayoutError:  # an encoder without FPN: its backbone alone
        return export_checkpoint(run_dir, "backbone", run_dir / "exported" / "backbone.pt").output


def finetune_arm(name: str, weights: Path | None, seed: int, budget: dict, deepforest: Path, study: Path,
                 device: str) -> dict:
    """Fine-tune one arm with one seed (or read its finished metrics)."""
    out_dir = study / "finetune" / f"{name}-seed{seed}"
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("bbox", {}).get("AP") is not None:
            return metrics
    config = replace(TransferConfig(**budget["transfer"]), seed=seed, device=device)
    return finetune(config, deepforest / "train.json", deepforest / "images", deepforest / "val.json",
                    deepforest / "images", out_dir, weights=weights, resume=True,
                    progress=sys.stderr.isatty(), log=lambda line: None)


def box_ap(metrics: dict) -> tuple[float, float]:
    """(AP, AP50) in percent from a fine-tuning metrics dict."""
    bbox = metrics["bbox"]
    return 100.0 * bbox["AP"], 100.0 * bbox["AP50"]


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """Mean and sample standard deviation of AP and AP50 per arm."""
    rows = []
    for arm, runs in results.items():
        aps = [box_ap(m)[0] for m in runs]
        ap50s = [box_ap(m)[1] for m in runs]
        rows.append({
            "arm": arm, "seeds": len(runs),
            "ap_mean": statistics.mean(aps), "ap_std": statistics.stdev(aps) if len(aps) > 1 else 0.0,
            "ap50_mean": statistics.mean(ap50s), "ap50_std": statistics.stdev(ap50s) if len(ap50s) > 1 else 0.0,
            "ap_per_seed": aps, "ap50_per_seed": ap50s,
        })
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the study."""
    lines = ["| arm | seeds | AP (mean ± std) | AP50 (mean ± std) | AP per seed |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        per_seed = ", ".join(f"{v:.1f}" for v in row["ap_per_seed"])
        lines.append(f"| {row['arm']} | {row['seeds']} | {row['ap_mean']:.2f} ± {row['ap_std']:.2f} | "
                     f"{row['ap50_mean']:.2f} ± {row['ap50_std']:.2f} | {per_seed} |")
    return "\n".join(lines)


def main() -> None:
    """Run (or continue) the study and write its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/transfer_study")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    study = Path(args.out)
    started = time.perf_counter()

    deepforest = prepare_deepforest(quiet=True)
    images = pretraining_images(study, deepforest)
    preset = load_config(budget["preset"])
    store = study / "proposals"
    if not is_store(store):
        run_proposals(images, store, preset.proposals, progress=sys.stderr.isatty())

    weights = {}
    for arm, starts in ARMS.items():
        weights[arm] = None if starts is None else pretrain_arm(arm, starts[args.budget], budget, images, store,
                                                                 study, args.device)
    pretrain_seconds = time.perf_counter() - started
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            metrics = finetune_arm(arm, weights[arm], seed, budget, deepforest, study, args.device)
            results[arm].append(metrics)
            ap, ap50 = box_ap(metrics)
            print(f"[{arm}] seed {seed}: AP {ap:.2f}, AP50 {ap50:.2f}", flush=True)
    rows = summarise(results)
    seconds = time.perf_counter() - started
    text = table(rows)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"transfer_study_{args.budget}"
    (RESULTS / f"{name}.json").write_text(json.dumps({
        "budget": args.budget, "pretrain": budget["pretrain"], "preset": budget["preset"],
        "transfer": budget["transfer"], "seeds": args.seeds, "rows": rows,
        "seconds": seconds, "pretrain_seconds": pretrain_seconds, "cpu_count": os.cpu_count(),
        "command": " ".join(["python", "benchmarks/transfer_study.py", *sys.argv[1:]]),
    }, indent=2))
    (RESULTS / f"{name}.md").write_text(
        f"# Transfer study ({args.budget} budget)\n\n`python benchmarks/transfer_study.py {' '.join(sys.argv[1:])}`"
        f" ({seconds / 60:.0f} min in all)\n\nPretraining: preset `{budget['preset']}` with "
        f"{', '.join(budget['pretrain'])} on DeepForest's training tiles plus the default photos.\n"
        f"Fine-tuning on DeepForest 400 px tiles (train 42 tiles, val 12 tiles): {budget['transfer']}.\n\n"
        f"{text}\n")


if __name__ == "__main__":
    main()
