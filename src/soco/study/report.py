"""Reading a study folder into numbers: AP per arm and reading over seeds, gaps against twice the seed spread, a plot.

A gap between two arms counts as real when it exceeds twice the larger of their two seed standard deviations
(sample standard deviation over seeds); with fewer than two seeds on either side no spread is known and the
gap is reported as unjudged.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from soco.study.design import BASELINE, READINGS, SCRATCH, parse_length_arm

__all__ = ["RunResult", "ArmSummary", "Gap", "collect_runs", "summarise", "gap", "markdown_table",
           "read_report_file", "runs_from_report", "summaries_from_report", "comparison_table", "plot_study",
           "SPREAD_FACTOR"]

SPREAD_FACTOR = 2.0  # a gap is real when it exceeds this many seed standard deviations


@dataclass
class RunResult:
    """One finished fine-tuning run: its final AP and the AP after each evaluated epoch (percent)."""

    arm: str
    reading: str
    seed: int
    ap: float
    ap50: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, AP)


@dataclass
class ArmSummary:
    """AP of one arm and reading over its seeds."""

    arm: str
    reading: str
    seeds: list[int]
    ap_per_seed: list[float]
    ap50_per_seed: list[float]

    @property
    def ap_mean(self) -> float:
        """Mean AP over seeds."""
        return statistics.mean(self.ap_per_seed)

    @property
    def ap_std(self) -> float | None:
        """Sample standard deviation of AP over seeds (None with one seed)."""
        return _sample_std(self.ap_per_seed)

    @property
    def ap50_mean(self) -> float:
        """Mean AP50 over seeds."""
        return statistics.mean(self.ap50_per_seed)

    @property
    def ap50_std(self) -> float | None:
        """Sample standard deviation of AP50 over seeds (None with one seed)."""
        return _sample_std(self.ap50_per_seed)


def _sample_std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Gap:
    """The difference of two arms' mean AP and whether it exceeds twice the larger seed spread."""

    difference: float
    threshold: float | None  # SPREAD_FACTOR x the larger standard deviation; None when a spread is unknown
    paired_seeds: list[int] | None = None  # set when the arms' seed sets differ: the seeds both have

    @property
    def exceeds(self) -> bool | None:
        """True / False against the threshold; None when no spread is known."""
        return None if self.threshold is None else abs(self.difference) > self.threshold

    def text(self) -> str:
        """'+3.10 (> 2σ = 1.20)', '+0.40 (within 2σ = 1.20)' or '+0.40 (spread unknown)'; 'seeds 0, 1: ...' when
        only the shared seeds were compared."""
        if self.threshold is None:
            text = f"{self.difference:+.2f} (spread unknown)"
        else:
            relation = ">" if self.exceeds else "within"
            text = f"{self.difference:+.2f} ({relation} 2σ = {self.threshold:.2f})"
        if self.paired_seeds is not None:
            text = f"seeds {', '.join(str(s) for s in self.paired_seeds)}: {text}"
        return text


def _curve(metrics: dict) -> list[tuple[int, float]]:
    points = [(int(record["epoch"]), 100.0 * record["val"]["bbox"]["AP"])
              for record in metrics.get("history", []) if record.get("val")]
    points.append((int(metrics["epochs_done"]), 100.0 * metrics["bbox"]["AP"]))
    return points


def collect_runs(study_dir: Path) -> list[RunResult]:
    """Every finished fine-tuning run of a study folder (unfinished ones are left out)."""
    runs = []
    for path in sorted((Path(study_dir) / "finetune").glob("*/*/seed*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not metrics.get("finished") or not metrics.get("bbox"):
            continue
        seed_dir, arm_dir, reading_dir = path.parent, path.parent.parent, path.parent.parent.parent
        runs.append(RunResult(arm=arm_dir.name, reading=reading_dir.name, seed=int(seed_dir.name[len("seed"):]),
                              ap=100.0 * metrics["bbox"]["AP"], ap50=100.0 * metrics["bbox"]["AP50"],
                              curve=_curve(metrics)))
    return runs


def _arm_order(arm: str) -> tuple:
    from soco.study.design import arm_names

    base, steps = parse_length_arm(arm)
    names = arm_names()
    return (names.index(base) if base in names else len(names), steps or 0, arm)


def _reading_arm_order(key: tuple[str, str]) -> tuple:
    """Sort key of a (reading, arm) pair: readings in READINGS order, then arms in the design's order."""
    reading, arm = key
    return (READINGS.index(reading) if reading in READINGS else len(READINGS), _arm_order(arm))


def summarise(runs: list[RunResult]) -> list[ArmSummary]:
    """One summary per (reading, arm), readings in READINGS order and arms in the design's order."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.reading, run.arm), []).append(run)
    keys = sorted(groups, key=_reading_arm_order)
    summaries = []
    for reading, arm in keys:
        group = sorted(groups[(reading, arm)], key=lambda run: run.seed)
        summaries.append(ArmSummary(arm, reading, [r.seed for r in group], [r.ap for r in group],
                                    [r.ap50 for r in group]))
    return summaries


def _on_seeds(summary: ArmSummary, seeds: list[int]) -> ArmSummary:
    keep = [summary.seeds.index(seed) for seed in seeds]
    return ArmSummary(summary.arm, summary.reading, list(seeds), [summary.ap_per_seed[i] for i in keep],
                      [summary.ap50_per_seed[i] for i in keep])


def gap(arm: ArmSummary, reference: ArmSummary) -> Gap:
    """arm's mean AP minus reference's, judged against SPREAD_FACTOR x the larger seed standard deviation.

    A seed fixes the fine-tuning's head initialisation and batch order for every arm alike, so when the two arms
    have different seed sets (a study under way) only the seeds both have are compared.
    """
    paired = None
    if set(arm.seeds) != set(reference.seeds):
        paired = sorted(set(arm.seeds) & set(reference.seeds))
        if not paired:
            return Gap(arm.ap_mean - reference.ap_mean, None, paired)
        arm, reference = _on_seeds(arm, paired), _on_seeds(reference, paired)
    spreads = (arm.ap_std, reference.ap_std)
    threshold = None if None in spreads else SPREAD_FACTOR * max(spreads)
    return Gap(arm.ap_mean - reference.ap_mean, threshold, paired)


def _spread(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(summaries: list[ArmSummary]) -> str:
    """A table per reading: AP and AP50 (mean ± std over seeds), AP per seed, gaps to scratch and the baseline."""
    lines = []
    for reading in dict.fromkeys(s.reading for s in summaries):
        rows = [s for s in summaries if s.reading == reading]
        by_arm = {s.arm: s for s in rows}
        lines += [f"**{reading}** fine-tuning", "",
                  "| arm | seeds | AP | AP50 | AP per seed | vs scratch | vs image-level BYOL |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            versus = []
            for reference in (SCRATCH, BASELINE):
                other = by_arm.get(reference)
                versus.append("" if other is None or other is row else gap(row, other).text())
            per_seed = ", ".join(f"{v:.1f}" for v in row.ap_per_seed)
            lines.append(f"| {row.arm} | {len(row.seeds)} | {row.ap_mean:.2f} ± {_spread(row.ap_std)} | "
                         f"{row.ap50_mean:.2f} ± {_spread(row.ap50_std)} | {per_seed} | {versus[0]} | {versus[1]} |")
        lines.append("")
    return "\n".join(lines)


def read_report_file(path: Path, option: str) -> dict:
    """A study report's .json handed to `option` (--compare-to, --merge); ConfigError naming the option and file."""
    from soco.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"{option}: {path} is not a file (a study_<budget>.json is expected)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{option}: {path} is not a readable study report ({error})") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise ConfigError(f"{option}: {path} is not a study report (no 'rows' list)")
    return report


def runs_from_report(report: dict, source: str = "report") -> list[RunResult]:
    """Every run stored in a study report's .json (its rows' AP per seed, with the curves it kept)."""
    from soco.errors import ConfigError

    rows = report.get("rows")
    if not isinstance(rows, list):
        raise ConfigError(f"{source}: not a study report (no 'rows' list; expected a study_<budget>.json)")
    try:
        curves = {(c["arm"], c["reading"], int(c["seed"])): [tuple(point) for point in c["curve"]]
                  for c in report.get("curves", [])}
        runs = []
        for row in rows:
            ap50 = row.get("ap50_per_seed", row["ap_per_seed"])  # reports before AP50 was kept
            if not len(row["seeds"]) == len(row["ap_per_seed"]) == len(ap50):
                raise ConfigError(f"{source}: row {row['arm']} {row['reading']} has {len(row['seeds'])} seeds but "
                                  f"{len(row['ap_per_seed'])} AP values")
            for seed, ap, ap50_value in zip(row["seeds"], row["ap_per_seed"], ap50):
                key = (row["arm"], row["reading"], int(seed))
                runs.append(RunResult(*key, ap=float(ap), ap50=float(ap50_value), curve=curves.get(key, [])))
    except KeyError as error:
        raise ConfigError(f"{source}: a row or curve lacks {error} (a row needs arm, reading, seeds, "
                          f"ap_per_seed)") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: a row or curve is malformed ({error})") from None
    return runs


def summaries_from_report(report: dict, source: str = "report") -> list[ArmSummary]:
    """The arm summaries stored in a study report's .json ("rows"), for comparing a rerun with it."""
    return summarise(runs_from_report(report, source))


def comparison_table(before: list[ArmSummary], after: list[ArmSummary], before_name: str = "before") -> str:
    """A table per reading: each arm's AP in an earlier study and now, the change, and whether it exceeds 2σ.

    The change is judged as a gap between arms is (``gap``: twice the larger seed spread of the two, on the seeds
    both have); an arm present on one side only gets a dash on the other.
    """
    lines = []
    earlier = {(s.reading, s.arm): s for s in before}
    now = {(s.reading, s.arm): s for s in after}
    keys = sorted(set(earlier) | set(now), key=_reading_arm_order)
    for reading in dict.fromkeys(key[0] for key in keys):
        lines += [f"**{reading}** fine-tuning: {before_name} against now", "",
                  f"| arm | AP {before_name} | AP now | change |", "| --- | --- | --- | --- |"]
        for key in (k for k in keys if k[0] == reading):
            old, new = earlier.get(key), now.get(key)
            cells = [f"{s.ap_mean:.2f} ± {_spread(s.ap_std)}" if s else "—" for s in (old, new)]
            change = gap(new, old).text() if old and new else ""
            lines.append(f"| {key[1]} | {cells[0]} | {cells[1]} | {change} |")
        lines.append("")
    return "\n".join(lines)


def _length_points(summaries: list[ArmSummary], reading: str, main_steps: int, arm: str = "soco"):
    points = []
    for summary in summaries:
        if summary.reading != reading:
            continue
        base, steps = parse_length_arm(summary.arm)
        if summary.arm == SCRATCH:
            points.append((0, summary))
        elif base == arm:
            points.append((steps or main_steps, summary))
    return sorted(points, key=lambda point: point[0])


def plot_study(runs: list[RunResult], path: Path, main_steps: int, title: str = "") -> Path | None:
    """Learning curves (val AP over fine-tuning epochs, mean ± std over seeds) per reading, and AP vs SoCo length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from soco.data.batch_drawing import save_figure

    if not runs:
        return None
    summaries = summarise(runs)
    readings = [r for r in READINGS if any(run.reading == r for run in runs)]
    figure, axes = plt.subplots(1, len(readings) + 1, figsize=(5.2 * (len(readings) + 1), 4.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    arm_names = sorted({run.arm for run in runs if parse_length_arm(run.arm)[1] is None}, key=_arm_order)
    for axis, reading in zip(axes[0], readings):
        for index, arm in enumerate(arm_names):
            curves = [dict(run.curve) for run in runs if run.reading == reading and run.arm == arm]
            if not curves:
                continue
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            values = np.array([[c[e] for e in epochs] for c in curves])
            mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(curves) > 1 else 0 * values[0]
            axis.plot(epochs, mean, marker="o", markersize=3, color=colours(index), label=f"{arm} ({len(curves)})")
            axis.fill_between(epochs, mean - std, mean + std, color=colours(index), alpha=0.15)
        axis.set_title(f"{reading} fine-tuning: val AP over epochs", fontsize=10)
        axis.set_xlabel("fine-tuning epoch")
        axis.set_ylabel("box AP (%)")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7, title="arm (seeds)", title_fontsize=7)
    axis = axes[0][-1]
    for index, reading in enumerate(readings):
        points = _length_points(summaries, reading, main_steps)
        if len(points) < 2:
            continue
        steps = [p[0] for p in points]
        axis.errorbar(steps, [p[1].ap_mean for p in points], yerr=[p[1].ap_std or 0.0 for p in points],
                      marker="o", capsize=3, label=reading, color=colours(index))
    axis.set_title("SoCo: final AP against pretraining steps (0: scratch)", fontsize=10)
    axis.set_xlabel("pretraining steps")
    axis.set_ylabel("box AP (%)")
    axis.grid(alpha=0.3)
    if axis.lines:
        axis.legend(fontsize=7)
    else:
        axis.text(0.5, 0.5, "no other pretraining length finished yet", ha="center", va="center",
                  transform=axis.transAxes, fontsize=8, color="grey")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)
