"""Entry point of the `soco` command: parses arguments and hands each subcommand to its module."""

from __future__ import annotations

import argparse
import re
import sys

from soco import __version__
from soco.errors import SocoError

DESCRIPTION = "soco: self-supervised pretraining aligned to object detection."


OVERRIDE_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")
CONFIGURABLE_COMMANDS = ("proposals", "pretrain", "bench", "transfer")
OPTIONS_WITH_OVERRIDE_VALUES = ("--compare",)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command and the problem, like soco's own."""

    def error(self, message: str):
        """Print `PROG: error: MESSAGE (see PROG --help)` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and key=value overrides (anywhere on the line), shared by every configurable command."""
    parser.add_argument("--config", default=None, help="preset name or YAML file (default: the 'default' preset)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. proposals.workers=4")


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take `section.key=value` tokens out of the command line, wherever they stand among the options."""
    if not argv or argv[0] not in CONFIGURABLE_COMMANDS:
        return argv, []
    rest, overrides = [], []
    for position, token in enumerate(argv):
        # an option that takes a key=value as its own argument keeps it (soco bench --compare KEY=VALUE)
        follows_option = position > 0 and argv[position - 1] in OPTIONS_WITH_OVERRIDE_VALUES
        (overrides if OVERRIDE_PATTERN.match(token) and not follows_option else rest).append(token)
    return rest, overrides


def _add_data_parsers(commands) -> None:
    """`soco data photos | deepforest | voc | composed`."""
    from soco.cli import data_commands, transfer_commands

    data = commands.add_parser("data", help="assemble built-in data sets")
    data_sets = data.add_subparsers(dest="data_set", metavar="DATASET", required=True)
    photos = data_sets.add_parser("photos", help="the default unlabeled photos, from installed packages")
    photos.add_argument("--dest", default=None, help="folder to assemble into (default: the cache folder)")
    photos.add_argument("--print-path", action="store_true", help="only print the folder (assembling it if needed)")
    deepforest = data_sets.add_parser("deepforest", help="DeepForest's labeled aerial trees as COCO 400x400 tiles")
    transfer_commands.add_deepforest_arguments(deepforest)
    voc = data_sets.add_parser("voc", help="convert a Pascal VOC folder (XML annotations) to COCO JSON per split")
    data_commands.add_voc_arguments(voc)
    composed = data_sets.add_parser("composed", help="labelled 7-class scenes: photographic cut-outs pasted on the "
                                                     "default photos (COCO boxes and masks)")
    data_commands.add_composed_arguments(composed)


def _add_proposal_parsers(commands) -> None:
    """`soco proposals` and `soco proposals merge`."""
    from soco.config.validation import count_argument

    proposals = commands.add_parser(
        "proposals",
        help="selective-search proposals for an image folder (or: soco proposals merge SRC... -o STORE)",
    )
    proposals.add_argument("images", help="image folder (searched recursively)")
    proposals.add_argument("-o", "--output", required=True, help="proposal store folder to create or continue")
    proposals.add_argument("--workers", type=count_argument(0), default=None,
                           help="processes; 0: one per core (default: proposals.workers of the config, 0)")
    proposals.add_argument("--shard", default=None, help="I/N: compute only shard I of N (0-based)")
    proposals.add_argument("--algorithm", default=None,
                           help="'release' (default: SoCo's release's own selective search, box for box), 'package' "
                                "(the selectivesearch package at soco's earlier parameters), 'rich' (more boxes) or "
                                "'repaired' (the paper's with repaired histograms, full resolution, slow)")
    proposals.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_arguments(proposals)

    # reached as `soco proposals merge`, and named so in its usage and errors
    merge = commands.add_parser("proposals-merge", prog="soco proposals merge",
                                description="merge the stores of `soco proposals --shard I/N` runs into one store")
    merge.add_argument("sources", nargs="+", help="output folders of the shard runs")
    merge.add_argument("-o", "--output", required=True, help="the merged store")


def _add_store_parsers(commands) -> None:
    """`soco inspect` and `soco show`, which read a proposal store."""
    inspect = commands.add_parser("inspect", help="summary of a proposal store")
    inspect.add_argument("store", metavar="STORE", help="a proposal store folder (made by `soco proposals`)")
    inspect.add_argument("--json", action="store_true", help="every image's boxes as JSON on stdout")

    show = commands.add_parser("show", help="draw one image's proposals to a PNG")
    show.add_argument("store", metavar="STORE", help="a proposal store folder (made by `soco proposals`)")
    show.add_argument("--image", default=None, help="relative path (or index) of the image; default: the first")
    show.add_argument("--images", default=None, help="image folder (default: the one the store was made from)")
    show.add_argument("-o", "--output", required=True, help="PNG file to write")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from soco.cli import bench_command, export_command, pretrain_command, probe_command, study_command
    from soco.cli import transfer_commands

    parser = OneLineErrorParser(prog="soco", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"soco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_parsers(commands)
    _add_proposal_parsers(commands)
    pretrain = commands.add_parser("pretrain", help="SoCo pretraining (no arguments: a small run on the default photos)")
    pretrain_command.add_arguments(pretrain)
    bench = commands.add_parser("bench", help="images/s and memory of training steps and data loading (JSON)")
    bench_command.add_arguments(bench)
    commands.add_parser("methods", help="the pretraining methods, with their presets and study arms")
    export = commands.add_parser("export", help="pretrained weights for torchvision, Detectron2, MMDetection")
    export_command.add_arguments(export)
    transfer = commands.add_parser("transfer", help="fine-tune a torchvision detector and measure COCO AP")
    transfer_commands.add_transfer_arguments(transfer)
    probe = commands.add_parser("probe", help="k-NN and linear-probe accuracy of pretrained weights on labelled boxes")
    probe_command.add_arguments(probe)
    study = commands.add_parser("study", help="what pretraining buys: every method fine-tuned, several seeds (resumable)")
    study_command.add_arguments(study)
    _add_store_parsers(commands)
    return parser


def list_methods() -> int:
    """Print every registered method: its summary, the presets that name it, its preset per size, its study arms."""
    from soco.config.loading import every_preset, load_preset_values
    from soco.registry import method_class, method_names, study_arms

    presets: dict[str, list[str]] = {}
    for preset in every_preset():
        named = (load_preset_values(preset).get("method") or {}).get("name")
        if named:
            presets.setdefault(named, []).append(preset)
    arms = study_arms()
    for name in method_names():
        cls = method_class(name)
        summary = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {summary}")
        sizes = ", ".join(f"{size}: {preset}" for size, preset in cls.presets.by_size().items()) if cls.presets \
            else f"small: {cls.default_preset}"
        print(f"  presets: {', '.join(presets.get(name, []))} ({sizes})")
        for arm in (arm for arm in arms if arm.name in {own.name for own in cls.study_arms}):
            print(f"  study arm {arm.name}: {describe_arm(arm, cls.presets)}")
    return 0


def describe_arm(arm, method_presets=None) -> str:
    """A study arm in one line: what it pretrains, its presets (unless the method's), what it exports, its overrides."""
    parts = [arm.note]
    if arm.presets != method_presets:
        parts.append("presets " + ", ".join(f"{size}: {preset}" for size, preset in arm.presets.by_size().items()))
    parts.append(f"exports {arm.exports}")
    if arm.pretrains_fpn_and_head:
        parts.append("the budget's head widths apply")
    parts += [f"{budget} budget: {' '.join(overrides)}" for budget, overrides in arm.budget_overrides.items()]
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the `soco` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["proposals", "merge"]:
        argv = ["proposals-merge", *argv[2:]]
    argv, overrides = _split_overrides(argv)
    args = build_parser().parse_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    try:
        if args.command == "data" and args.data_set == "deepforest":
            from soco.cli import transfer_commands

            return transfer_commands.run_deepforest(args)
        if args.command == "transfer":
            from soco.cli import transfer_commands

            return transfer_commands.run_transfer(args)
        if args.command == "data":
            from soco.cli import data_commands

            return data_commands.run(args)
        if args.command == "methods":
            return list_methods()
        if args.command == "probe":
            from soco.cli import probe_command

            return probe_command.run(args)
        if args.command == "study":
            from soco.cli import study_command

            return study_command.run(args)
        if args.command == "export":
            from soco.cli import export_command

            return export_command.run(args)
        if args.command == "bench":
            from soco.cli import bench_command

            return bench_command.run(args)
        if args.command == "pretrain":
            from soco.cli import pretrain_command

            return pretrain_command.run(args)
        if args.command in ("proposals", "proposals-merge", "inspect", "show"):
            from soco.cli import proposal_commands

            return proposal_commands.run(args)
    except SocoError as error:
        print(f"soco: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file or folder the user named cannot be read or written
        print(f"soco: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soco: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
