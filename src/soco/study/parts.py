"""A study run in parts: the finished arms of an earlier part's report (.json) joined to this study folder's.

A study can be longer than one machine is lent for (the cpu budget takes about 3 h on 2 cores), and a study folder
holds checkpoints that do not travel well. So a part's report carries everything a report needs of its arms: the
AP of every run, the curves, the probe scores and the wall times, and the design it was run under (the budget's
settings and the data). `soco study --merge PART.json` takes from each part the arms this folder has no finished
run of; a part of another design is refused, since its numbers would not be comparable.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from soco.errors import ConfigError
from soco.study.report import RunResult, read_report_file, runs_from_report

__all__ = ["StudyPart", "design_record", "source_revision", "read_part", "merge_parts", "piece_arm", "only_arms"]

# Budget fields that do not change what a run computes: a part may have run other seeds, and notes are prose.
_DESIGN_FREE_FIELDS = ("seeds", "notes")


def design_record(budget, data_name: str) -> dict:
    """What makes two parts' runs comparable: the budget's settings (seeds and notes aside) and the data."""
    settings = {key: value for key, value in dataclasses.asdict(budget).items() if key not in _DESIGN_FREE_FIELDS}
    return json.loads(json.dumps({"budget": settings, "data": data_name}))  # tuples as lists, as read back


def source_revision() -> str | None:
    """The git commit of the soco source that runs ('+' when it has uncommitted changes); None outside a checkout."""
    source = Path(__file__).resolve().parents[1]  # the soco package: a change anywhere in it counts
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=source,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+" if dirty.stdout.strip() else "")


@dataclass
class StudyPart:
    """The finished arms of one earlier part's report."""

    source: str  # the report file, as given
    runs: list[RunResult]
    timings: dict[str, float]
    probe: dict[str, dict[str, dict]]  # stage -> backbone -> scores
    # arm -> (report file as given, soco revision, machine) of the run that made it: the part's own, or, for an arm
    # the part had itself merged, the earlier part's, so a chain of merges keeps each arm's provenance
    origins: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)

    @property
    def arms(self) -> list[str]:
        """The part's arms, in the order of its rows."""
        return list(dict.fromkeys(run.arm for run in self.runs))


def read_part(path: Path, design: dict) -> StudyPart:
    """An earlier part's report; ConfigError naming the file when it is unreadable or of another design."""
    report = read_report_file(path, "--merge")
    if "design" not in report:
        raise ConfigError(f"--merge: {path} records no design (written by an older soco), so its runs cannot be "
                          f"checked against this study's settings; rerun its arms here instead")
    earlier = report["design"]
    if earlier != design:
        differ = sorted(key for key in set(earlier.get("budget", {})) | set(design["budget"])
                        if earlier.get("budget", {}).get(key) != design["budget"].get(key))
        if earlier.get("data") != design["data"]:
            differ.append("data")
        raise ConfigError(f"--merge: {path} is a part of another study design (differs in: {', '.join(differ)}); "
                          f"only parts run with the same budget settings and data can be merged")
    runs = runs_from_report(report, f"--merge: {path}")
    own = (str(path), report.get("revision"), report.get("machine"))
    origins = {run.arm: own for run in runs}
    for earlier_part in report.get("parts", []):
        for arm in earlier_part.get("arms", []):
            if arm in origins:
                origins[arm] = (earlier_part.get("file", str(path)), earlier_part.get("revision"),
                                earlier_part.get("machine"))
    return StudyPart(str(path), runs, dict(report.get("timings_seconds", {})), dict(report.get("probe", {})),
                     origins)


def piece_arm(piece: str) -> str | None:
    """The arm a timings key belongs to ('pretrain/soco', 'finetune/full/soco/seed0'), None for shared pieces."""
    parts = piece.split("/")
    if parts[0] == "pretrain" and len(parts) == 2:
        return parts[1]
    if parts[0] == "finetune" and len(parts) == 4:
        return parts[2]
    return None


def merge_parts(runs: list[RunResult], timings: dict[str, float], probe: dict, parts: list[StudyPart]):
    """(runs, timings, probe, origins) with each part's arms that `runs` lacks; origins maps each merged arm to the
    (report file as given to --merge, soco revision, machine) that ran it.

    An arm comes whole from one place: this folder when it has any finished run of it, else the one part that
    has it (ConfigError when two parts do, since which to take would be a guess).
    """
    from soco.study.runner import RANDOM_INIT

    local_arms = {run.arm for run in runs}
    owner: dict[str, str] = {}
    for part in parts:
        for arm in part.arms:
            if arm in local_arms:
                continue
            if arm in owner:
                raise ConfigError(f"--merge: arm {arm} is in both {owner[arm]} and {part.source}; merge one of them")
            owner[arm] = part.source
    merged_runs, merged_timings = list(runs), dict(timings)
    merged_probe = {stage: dict(scores) for stage, scores in probe.items()}
    origins: dict[str, tuple[str, str | None, str | None]] = {}
    for part in parts:
        arms = [arm for arm in part.arms if owner.get(arm) == part.source]
        origins.update({arm: part.origins[arm] for arm in arms})
        merged_runs += [run for run in part.runs if run.arm in arms]
        merged_timings.update({piece: seconds for piece, seconds in part.timings.items()
                               if piece_arm(piece) in arms})
        for stage, scores in part.probe.items():
            # the random init is the same backbone in every part (seed 0): taken where this folder has none
            merged_probe.setdefault(stage, {}).update({name: score for name, score in scores.items()
                                                       if (name in arms or name == RANDOM_INIT)
                                                       and name not in merged_probe[stage]})
    return merged_runs, merged_timings, merged_probe, origins


def only_arms(arms: list[str], runs: list[RunResult], timings: dict[str, float], probe: dict, origins: dict):
    """(runs, timings, probe, origins) of these arms alone: the shared pieces' timings and the random init's probe
    stay."""
    from soco.study.runner import RANDOM_INIT

    kept = set(arms)
    return ([run for run in runs if run.arm in kept],
            {piece: seconds for piece, seconds in timings.items() if piece_arm(piece) in kept | {None}},
            {stage: {name: score for name, score in scores.items() if name in kept | {RANDOM_INIT}}
             for stage, scores in probe.items()},
            {arm: origin for arm, origin in origins.items() if arm in kept})
