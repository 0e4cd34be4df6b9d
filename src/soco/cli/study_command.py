"""`soco study`: what pretraining buys, every arm fine-tuned under one budget with several seeds; resumable."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

from soco.config.validation import config_argument

DEFAULT_STUDY_OUT = Path("runs") / "study"
REPORT_STEM = "study"  # study_<budget>.md / .json / .png


class _ArmNames:
    """The arms' names for `--help`, read from the registry only when the help is printed.

    The registry imports every method (and torch); building the parser of any soco command must not.
    """

    def __str__(self) -> str:
        from soco.study.design import arm_names

        return " ".join(arm_names())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `soco study`."""
    parser.add_argument("--budget", default="cpu", choices=["cpu", "gpu"],
                        help="cpu: R18, 96 px views, 200 px tiles (about 3 h on 2 cores); gpu: the paper's R50-FPN "
                             "(docs/study.md)")
    arms = parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                               help="arms to run (default: all: %(arm_names)s, and SoCo at the budget's other "
                                    "lengths, e.g. soco@75); ARM@STEPS pretrains ARM to STEPS; `soco methods` "
                                    "says which method each arm is")
    arms.arm_names = _ArmNames()  # argparse fills %(arm_names)s from the action's attributes when formatting
    parser.add_argument("--plan", action="store_true",
                        help="only print what each arm pretrains (preset and overrides, checked), exports and how it "
                             "is fine-tuned; runs nothing")
    parser.add_argument("--seeds", nargs="+", type=config_argument("soco.study.design:Budget", "seeds"), default=None,
                        help="fine-tuning seeds, each at least 0 (default 0 1 2)")
    parser.add_argument("--readings", nargs="+", default=["full", "frozen"], choices=["full", "frozen"],
                        help="full: every weight fine-tunes; frozen: backbone and FPN frozen (default both)")
    parser.add_argument("--train", default=None, metavar="ANN.json",
                        help="COCO training annotations (default: DeepForest tiles); their images are also the "
                             "unlabeled pretraining data")
    parser.add_argument("--train-images", default=None, metavar="DIR", help="default: 'images' next to --train")
    parser.add_argument("--val", default=None, metavar="ANN.json", help="COCO validation annotations")
    parser.add_argument("--val-images", default=None, metavar="DIR", help="default: 'images' next to --val")
    parser.add_argument("--unlabeled", nargs="*", default=None, metavar="DIR",
                        help="extra unlabeled folders to pretrain on (default data: the default photos; "
                             "--train data: none)")
    parser.add_argument("--out", default=str(DEFAULT_STUDY_OUT), help=f"study folder (default {DEFAULT_STUDY_OUT})")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="where study_BUDGET.md, .json and .png go (default: the study folder)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the report from finished runs (with --arms: of those arms alone)")
    parser.add_argument("--compare-to", default=None, metavar="EARLIER.json",
                        help="an earlier study's report (.json): the report adds each arm's AP then and now, and "
                             "whether the change exceeds twice the seed spread")
    parser.add_argument("--merge", nargs="+", default=[], metavar="PART.json",
                        help="reports (.json) of earlier parts of this study, run in other folders or on other "
                             "machines: each arm this folder has no finished run of is taken from them (refused "
                             "when a part's budget settings or data differ)")
    parser.add_argument("--no-probe", action="store_true", help="skip the box-feature probe of the pretrained arms")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _data(args: argparse.Namespace, budget):
    from soco.errors import ConfigError
    from soco.study.runner import StudyData, default_data

    if (args.train is None) != (args.val is None):
        raise ConfigError("--train and --val go together (or give neither for the default DeepForest data)")
    if args.train is None:
        data = default_data(budget, progress=not args.quiet)
        if args.unlabeled is not None:
            data.unlabeled = [Path(d).expanduser() for d in args.unlabeled]
        return data
    train, val = Path(args.train).expanduser(), Path(args.val).expanduser()
    for path in (train, val):
        if not path.is_file():
            raise ConfigError(f"annotations file {path} does not exist")
    return StudyData(train, Path(args.train_images).expanduser() if args.train_images else train.parent / "images",
                     val, Path(args.val_images).expanduser() if args.val_images else val.parent / "images",
                     unlabeled=[Path(d).expanduser() for d in (args.unlabeled or [])], name=str(train))


def report_stem(budget) -> str:
    """The report files' name without suffix: study_<budget>."""
    return f"{REPORT_STEM}_{budget.name}"


def read_earlier_report(path: Path) -> list:
    """The arm summaries of an earlier study's report (.json) for --compare-to; ConfigError naming the file."""
    from soco.study.report import read_report_file, summaries_from_report

    return summaries_from_report(read_report_file(path, "--compare-to"), str(path))


def machine_description() -> str:
    """This machine in words for a report: CPU cores, architecture, CPU model and GPU where known."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = ", " + line.partition(":")[2].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f" and {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores ({platform.machine()}{model}){gpu}"


def read_parts(paths: list[str], budget, data_name: str) -> list:
    """The earlier parts given to --merge, each checked against this study's design; ConfigError naming a file."""
    from soco.study.parts import design_record, read_part

    design = design_record(budget, data_name)
    return [read_part(Path(path).expanduser(), design) for path in paths]


@dataclasses.dataclass
class ReportInputs:
    """What a report states beyond a study folder's own runs: the command, provenance, parts and a comparison.

    ``compared``: an earlier report's file name and its arm summaries (the .md adds each arm's AP then and now).
    ``parts``: earlier parts' reports (`study.parts.read_part`), whose arms this folder has no finished run of
    join the report, which says where each came from. ``revision``: the soco commit that ran this folder's runs
    (`study.parts.source_revision`, read when the study started); ``machine``: the machine that ran them (None:
    this one). ``arms``: report those arms alone (None: every arm).
    """

    command: str = "soco study"
    compared: tuple[str, list] | None = None
    parts: list = dataclasses.field(default_factory=list)
    revision: str | None = None
    machine: str | None = None
    arms: list[str] | None = None


def write_report(study_dir: Path, report_dir: Path, budget, data_name: str, inputs: ReportInputs) -> Path:
    """study.md, study.json and study.png from every finished run of the study folder (and ``inputs``' parts);
    returns the .md path."""
    from soco.files import atomic_write_text
    from soco.study.parts import design_record, merge_parts, only_arms
    from soco.study.report import collect_runs, comparison_table, markdown_table, plot_study, summarise
    from soco.study.runner import PROBE_NAME, TIMINGS_NAME

    runs = collect_runs(study_dir)
    timings = json.loads((study_dir / TIMINGS_NAME).read_text()) if (study_dir / TIMINGS_NAME).is_file() else {}
    probe = json.loads((study_dir / PROBE_NAME).read_text()) if (study_dir / PROBE_NAME).is_file() else {}
    command, compared, revision = inputs.command, inputs.compared, inputs.revision
    machine = inputs.machine or machine_description()
    runs, timings, probe, origins = merge_parts(runs, timings, probe, inputs.parts)
    if inputs.arms is not None:
        runs, timings, probe, origins = only_arms(inputs.arms, runs, timings, probe, origins)
    merged_from: dict[tuple, list[str]] = {}  # (file, revision, machine) -> the arms it ran
    for arm, origin in origins.items():
        merged_from.setdefault(origin, []).append(arm)
    summaries = summarise(runs)
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(budget)
    picture = plot_study(runs, report_dir / f"{stem}.png", budget.pretrain_steps,
                         title=f"soco study, {budget.name} budget, {data_name}")
    total_minutes = sum(timings.values()) / 60
    where = f"on {machine}" + (" and the merged parts' machines" if merged_from else "")
    lines = [f"# What pretraining buys ({budget.name} budget)", "",
             f"`{command}`", "",
             f"Data: {data_name}. soco {revision or 'revision unknown'}. Wall time of the finished pieces "
             f"(pretraining, fine-tuning, probe), summed: {total_minutes:.0f} min {where}; "
             f"each piece's own figure is in the .json.", "",
             *[f"- {note}" for note in budget.notes],
             f"- pretraining: {budget.pretrain_steps} steps ({', '.join(budget.pretrain_overrides)}); SoCo also to "
             f"{', '.join(str(s) for s in budget.extra_lengths)} steps",
             "- fine-tuning: " + ", ".join(f"{key}={value}" for key, value in budget.transfer.items()), "",
             "A gap is real when it exceeds twice the larger seed standard deviation of the two arms.", "",
             markdown_table(summaries)]
    if merged_from:
        lines += ["Arms merged from earlier parts of this study (`--merge`; same budget settings and data, checked):",
                  "", *[f"- `{file}` (soco {part_revision or 'revision unknown'}, {part_machine or 'machine unknown'}):"
                        f" {', '.join(arms)}" for (file, part_revision, part_machine), arms in merged_from.items()],
                  ""]
    if probe:
        lines += ["Box-feature probe on the training boxes (object vs background crops of held-out images; "
                  "k-NN / linear accuracy):",
                  "", "| stage | backbone | k-NN | linear | majority |", "| --- | --- | --- | --- | --- |"]
        for stage, scores in probe.items():
            for name, score in scores.items():
                lines.append(f"| {stage} | {name} | {100 * score['knn']:.1f}% | {100 * score['linear']:.1f}% | "
                             f"{100 * score['majority']:.1f}% |")
        lines.append("")
    if compared is not None:
        earlier_name, before = compared
        lines += [f"## Against an earlier study: `{earlier_name}`", "",
                  "The change of an arm's mean AP is judged as a gap between arms is: real when it exceeds twice "
                  "the larger seed standard deviation of the two studies' runs.", "",
                  comparison_table(before, summaries, Path(earlier_name).stem)]
    if picture:
        lines += [f"![learning curves]({picture.name})", ""]
    markdown = report_dir / f"{stem}.md"
    atomic_write_text(markdown, "\n".join(lines) + "\n")
    atomic_write_text(report_dir / f"{stem}.json", json.dumps({
        "budget": budget.name, "data": data_name, "command": command, "design": design_record(budget, data_name),
        "revision": revision, "machine": machine,
        "parts": [{"file": file, "revision": part_revision, "machine": part_machine, "arms": arms}
                  for (file, part_revision, part_machine), arms in merged_from.items()],
        "timings_seconds": timings, "probe": probe,
        "rows": [{"arm": s.arm, "reading": s.reading, "seeds": s.seeds, "ap_per_seed": s.ap_per_seed,
                  "ap50_per_seed": s.ap50_per_seed, "ap_mean": s.ap_mean, "ap_std": s.ap_std}
                 for s in summaries],
        "curves": [{"arm": r.arm, "reading": r.reading, "seed": r.seed, "curve": r.curve} for r in runs],
    }, indent=1) + "\n")
    return markdown


def plan_lines(budget, arms: list[str], seeds: list[int], readings: list[str], device: str) -> list[str]:
    """What a study call would do for each arm, each pretraining configuration resolved (so checked) first."""
    from soco.config.loading import load_config
    from soco.study.design import SCRATCH, arms as every_arm, parse_length_arm
    from soco.study.runner import pretraining_settings, readings_of

    declared = every_arm()
    lines = [f"soco study, {budget.name} budget: {len(arms)} arm(s), seeds {' '.join(map(str, seeds))}"]
    for name in arms:
        base = parse_length_arm(name)[0]
        arm = declared[base]
        finetuned = f"fine-tuned {', '.join(readings_of(name, budget, readings)) or 'with no reading'}"
        if base == SCRATCH:
            lines.append(f"{name}: {arm.note}; {finetuned}")
            continue
        preset, overrides = pretraining_settings(name, budget, device)
        config = load_config(preset, overrides)
        lines.append(f"{name}: {arm.note}; method {config.method.name}, preset {preset} "
                     f"({' '.join(overrides)}), {config.train.steps} steps; exports {arm.exports}; {finetuned}")
    return lines


def print_plan(budget, arms: list[str], seeds: list[int], readings: list[str], device: str) -> int:
    """Print the plan of `soco study --plan`."""
    for line in plan_lines(budget, arms, seeds, readings, device):
        print(line)
    return 0


def _stop_cleanly_on_signals() -> None:
    """SIGTERM, and SIGINT even when a background shell ignored it, end the study through its `finally` blocks
    (each piece's time is recorded, loader workers are stopped); the next call resumes."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run(args: argparse.Namespace) -> int:
    """Run (or continue) `soco study`, then write its report."""
    import sys

    from soco.config.validation import validate_section
    from soco.errors import ConfigError
    from soco.study.design import BUDGETS, select_arms
    from soco.study.parts import source_revision
    from soco.study.runner import STUDY_MARKER, check_pretraining_configs, describe_data, read_json, run_study

    budget = BUDGETS[args.budget]
    if args.seeds is not None:
        budget = dataclasses.replace(budget, seeds=tuple(args.seeds))
    validate_section(budget, "budget")  # its fine-tuning keywords and seeds too, once, before any file is written
    arms = select_arms(args.arms, budget)
    seeds = list(budget.seeds)
    if args.plan:
        return print_plan(budget, arms, seeds, args.readings, args.device)
    if not args.report_only:
        check_pretraining_configs(arms, budget, args.device)  # every arm's, before soco-study.json is written
    study_dir = Path(args.out).expanduser()
    report_dir = Path(args.report).expanduser() if args.report else study_dir
    # Read once, before any run starts: a bad file is refused now, not at the first report hours later.
    compared = None
    if args.compare_to:
        compare_to = Path(args.compare_to).expanduser()
        compared = (compare_to.name, read_earlier_report(compare_to))
    command = "soco study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else "soco study"
    revision = None if args.report_only else source_revision()  # now: the code this process runs
    machine = None
    started = time.perf_counter()
    if args.report_only:
        marker = study_dir / STUDY_MARKER
        if not marker.is_file():
            raise ConfigError(f"--report-only: {study_dir} holds no study ({STUDY_MARKER} is missing)")
        data_name = read_json(marker).get("data", "?")
        # the report names the command that ran the study, not this one, when an earlier report recorded it
        earlier = report_dir / f"{report_stem(budget)}.json"
        if earlier.is_file():
            command = read_json(earlier).get("command", command)
            # the revision and machine of the call that ran the runs, when that report recorded them
            revision, machine = read_json(earlier).get("revision"), read_json(earlier).get("machine")
        parts = read_parts(args.merge, budget, data_name)
    else:
        data = _data(args, budget)
        data_name = describe_data(data)
        parts = read_parts(args.merge, budget, data_name)  # before any run: a part of another design is refused now

        def report() -> None:
            write_report(study_dir, report_dir, budget, data_name,
                         ReportInputs(command, compared, parts, revision, machine))

        _stop_cleanly_on_signals()
        run_study(budget, arms, seeds, args.readings, data, study_dir, device=args.device,
                  progress=False if args.quiet else None, probe=not args.no_probe, after_each=report)
    # a report-only call with --arms reports those arms alone (a part whose last arm is unfinished, say)
    reported = arms if args.report_only and args.arms else None
    markdown = write_report(study_dir, report_dir, budget, data_name,
                            ReportInputs(command, compared, parts, revision, machine, reported))
    print(markdown.read_text())
    print(f"study: {time.perf_counter() - started:.0f} s this call; report in {markdown}")
    return 0
