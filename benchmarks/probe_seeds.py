"""`soco probe` over several splits at once: mean and spread of each backbone's accuracy, and of its gap to random init.

    python benchmarks/probe_seeds.py --labels DIR/val.json --stage c4 --seeds 0 1 2 3 4 \
        --weights name=FILE [name=FILE ...] [--test-labels DIR/other.json] [--json OUT.json]

Every seed draws another split of the images (and another random initialisation, the floor); all backbones
are probed on the same crops in one pass per seed, so their gaps to the floor are paired.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from soco.labelled.coco import CocoDetection
from soco.transfer.probe import pretrained_trunk, probe_backbones
from soco.transfer.weights import read_weights, resnet_depth


def main() -> None:
    """Parse the options, probe every seed, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True)
    parser.add_argument("--test-labels", default=None)
    parser.add_argument("--stage", default="c4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--weights", nargs="+", required=True, metavar="NAME=FILE")
    parser.add_argument("--background", action="store_true", help="add background boxes (default: classes only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    labels = Path(args.labels)
    dataset = CocoDetection(labels, labels.parent / "images")
    test_dataset = None
    if args.test_labels:
        test_labels = Path(args.test_labels)
        test_dataset = CocoDetection(test_labels, test_labels.parent / "images", categories=dataset.category_ids)
    states = {}
    for item in args.weights:
        name, file = item.split("=", 1)
        states[name] = (read_weights(Path(file)), Path(file))
    depth = {resnet_depth(state) for state, _ in states.values()}
    assert len(depth) == 1, f"one ResNet depth at a time, got {depth}"
    depth = depth.pop()
    scores: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        backbones = {name: pretrained_trunk(depth, seed, state, file)[0] for name, (state, file) in states.items()}
        backbones["random init"] = pretrained_trunk(depth, seed)[0]
        results = probe_backbones(backbones, dataset, stage=args.stage, background=args.background, seed=seed,
                                  test_dataset=test_dataset)
        for name, result in results.items():
            entry = scores.setdefault(name, {"knn": [], "linear": []})
            entry["knn"].append(100 * result.knn_accuracy)
            entry["linear"].append(100 * result.linear_accuracy)
        shared = next(iter(results.values()))  # the crops, and so the majority floor, are every backbone's
        scores.setdefault("majority class", {"knn": [], "linear": []})
        scores["majority class"]["knn"].append(100 * shared.majority_accuracy)
        scores["majority class"]["linear"].append(100 * shared.majority_accuracy)
        print(f"seed {seed}: " + ", ".join(f"{name} {100 * r.knn_accuracy:.1f}/{100 * r.linear_accuracy:.1f}"
                                           for name, r in results.items()), flush=True)
        test_crops = shared.test_crops

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"

    floor = scores["random init"]
    print(f"\n{args.stage}, {len(args.seeds)} seeds, {test_crops} test crops per seed ({labels.name}"
          f"{' -> ' + Path(args.test_labels).name if args.test_labels else ', images split in two'})")
    print("| backbone | k-NN | k-NN - random, paired | linear | linear - random, paired |")
    print("| --- | --- | --- | --- | --- |")
    for name, entry in scores.items():
        gaps = {key: [a - b for a, b in zip(entry[key], floor[key])] for key in ("knn", "linear")}
        plain = name in ("random init", "majority class")
        print(f"| {name} | {spread(entry['knn'])} | {'' if plain else spread(gaps['knn'])} | "
              f"{spread(entry['linear'])} | {'' if plain else spread(gaps['linear'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"stage": args.stage, "seeds": args.seeds, "labels": str(labels),
                                               "test_labels": args.test_labels, "scores": scores}, indent=2))


if __name__ == "__main__":
    main()
