"""A study in parts: an earlier part's report merged into this folder's, checked for the same design."""

import json

import pytest

from soco.cli.main import main
from soco.errors import ConfigError
from soco.study.design import BUDGETS
from soco.study.parts import design_record, merge_parts, read_part, source_revision
from soco.study.report import RunResult


def _write_run(study, reading, arm, seed, ap):
    folder = study / "finetune" / reading / arm / f"seed{seed}"
    folder.mkdir(parents=True)
    history = [{"epoch": 2, "loss": 1.0, "val": {"bbox": {"AP": ap / 2, "AP50": ap}}}]
    metrics = {"finished": True, "epochs_done": 4, "history": history, "bbox": {"AP": ap, "AP50": 2 * ap}}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _study(folder, runs, timings, probe):
    """A study folder with finished runs {(reading, arm): [AP per seed]}, a timings.json and a probe.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for (reading, arm), aps in runs.items():
        for seed, ap in enumerate(aps):
            _write_run(folder, reading, arm, seed, ap)
    (folder / "soco-study.json").write_text(json.dumps({"data": "tiles"}))
    (folder / "timings.json").write_text(json.dumps(timings))
    (folder / "probe.json").write_text(json.dumps(probe))
    return folder


def _score(accuracy):
    return {"knn": accuracy, "linear": accuracy, "majority": 0.5, "test_crops": 10}


def _report(study, reports, *merge):
    assert main(["study", "--out", str(study), "--report", str(reports), "--report-only",
                 *(["--merge", *map(str, merge)] if merge else [])]) == 0
    return (reports / "study_cpu.md").read_text(), json.loads((reports / "study_cpu.json").read_text())


@pytest.fixture
def part_one(tmp_path):
    """Part 1 ran scratch and soco; its report is what a later part merges."""
    study = _study(tmp_path / "one", {("full", "scratch"): [0.02, 0.04], ("full", "soco"): [0.05, 0.07]},
                   {"proposals": 30.0, "pretrain/soco": 200.0, "finetune/full/soco/seed0": 100.0,
                    "finetune/full/scratch/seed0": 90.0, "probe": 5.0},
                   {"c4": {"soco": _score(0.7), "random init": _score(0.6)}})
    _report(study, tmp_path / "one-report")
    return tmp_path / "one-report" / "study_cpu.json"


def test_a_later_part_takes_the_arms_it_lacks_from_an_earlier_part(tmp_path, part_one, capsys):
    # part 2 ran byol and scratch again: its own scratch wins, soco comes from part 1
    study = _study(tmp_path / "two", {("full", "byol"): [0.03, 0.05], ("full", "scratch"): [0.10, 0.12]},
                   {"proposals": 40.0, "pretrain/byol": 300.0, "probe": 6.0},
                   {"c4": {"byol": _score(0.8), "random init": _score(0.55)}})
    markdown, report = _report(study, tmp_path / "two-report", part_one)
    assert "| scratch | 2 | 11.00 ± 1.41 |" in markdown  # this folder's (10, 12), not part 1's (2, 4)
    assert "| soco | 2 | 6.00 ± 1.41 | 12.00 ± 2.83 | 5.0, 7.0 | -5.00 (> 2σ = 2.83) |" in markdown
    assert "| byol | 2 | 4.00 ± 1.41 |" in markdown
    assert f"- `{part_one}` (soco revision unknown, " in markdown and "): soco" in markdown
    assert [part["arms"] for part in report["parts"]] == [["soco"]]
    assert report["timings_seconds"] == {"proposals": 40.0, "pretrain/byol": 300.0, "probe": 6.0,
                                         "pretrain/soco": 200.0, "finetune/full/soco/seed0": 100.0}
    assert report["probe"]["c4"] == {"byol": _score(0.8), "random init": _score(0.55), "soco": _score(0.7)}
    assert {(c["arm"], c["seed"]): c["curve"] for c in report["curves"]}[("soco", 1)] == [[2, pytest.approx(3.5)],
                                                                                      [4, pytest.approx(7.0)]]

    # the merged report is itself a part: soco keeps part 1's provenance, byol gets part 2's
    renamed = tmp_path / "study_cpu_part2.json"
    renamed.write_text((tmp_path / "two-report" / "study_cpu.json").read_text())
    empty = _study(tmp_path / "three", {}, {}, {})
    _, chained = _report(empty, tmp_path / "three-report", renamed)
    origins = {arm: part["file"] for part in chained["parts"] for arm in part["arms"]}
    assert origins == {"scratch": str(renamed), "byol": str(renamed), "soco": str(part_one)}


def test_a_part_of_another_design_or_an_old_report_is_refused(tmp_path, part_one, capsys):
    design = design_record(BUDGETS["cpu"], "tiles")
    assert read_part(part_one, design).arms == ["scratch", "soco"]
    other = dict(design, budget=dict(design["budget"], transfer=dict(design["budget"]["transfer"], epochs=12)))
    with pytest.raises(ConfigError, match=r"study_cpu.json is a part of another study design \(differs in: transfer\)"):
        read_part(part_one, other)
    with pytest.raises(ConfigError, match=r"differs in: data"):
        read_part(part_one, design_record(BUDGETS["cpu"], "other tiles"))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [], "budget": "cpu"}))
    with pytest.raises(ConfigError, match="old.json records no design"):
        read_part(old, design)
    # through the command: one line naming the file, nothing written
    study = _study(tmp_path / "two", {("full", "byol"): [0.03]}, {}, {})
    assert main(["study", "--out", str(study), "--report", str(tmp_path / "r"), "--report-only",
                 "--merge", str(old)]) != 0
    assert "old.json records no design" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_arm_in_two_parts_is_refused_and_seeds_may_differ(tmp_path, part_one):
    design = design_record(BUDGETS["cpu"], "tiles")
    part = read_part(part_one, design)
    with pytest.raises(ConfigError, match="arm scratch is in both .*study_cpu.json and .*study_cpu.json"):
        merge_parts([], {}, {}, [part, part])
    # an arm this folder has settles it: neither part's scratch is taken, soco still comes from one part
    local = [RunResult("scratch", "full", 0, ap=1.0, ap50=2.0)]
    with pytest.raises(ConfigError, match="arm soco is in both"):
        merge_parts(local, {}, {}, [part, part])
    runs, _, _, origins = merge_parts(local, {}, {}, [part])
    assert sorted((r.arm, r.seed, r.ap) for r in runs) == [("scratch", 0, 1.0), ("soco", 0, pytest.approx(5.0)),
                                                            ("soco", 1, pytest.approx(7.0))]
    assert list(origins) == ["soco"]
    # seeds are not part of the design: a part run with other seeds merges
    assert design_record(BUDGETS["cpu"].__class__(**{**BUDGETS["cpu"].__dict__, "seeds": (5,)}), "tiles") == design


def test_source_revision_is_the_checkout_s_commit():
    import subprocess
    from pathlib import Path

    import soco

    package = Path(soco.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("soco is not installed from a git checkout")
    revision = source_revision()
    assert revision.rstrip("+") == head.stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True,
                             text=True).stdout.strip()
    assert revision.endswith("+") == bool(changed)


def test_a_report_only_call_with_arms_reports_those_arms_alone(tmp_path, part_one):
    study = _study(tmp_path / "two", {("full", "byol"): [0.03, 0.05], ("frozen", "scrl"): [0.01]},
                   {"proposals": 40.0, "pretrain/byol": 300.0, "pretrain/scrl": 50.0, "finetune/frozen/scrl/seed0": 9.0},
                   {"c5": {"byol": _score(0.8), "scrl": _score(0.4), "random init": _score(0.55)}})
    markdown, report = _report_with(study, tmp_path / "r", "--arms", "byol", "soco", "--merge", str(part_one))
    assert [(row["arm"], row["reading"]) for row in report["rows"]] == [("byol", "full"), ("soco", "full")]
    assert "scrl" not in markdown and "| scratch |" not in markdown  # scratch is in part 1 but not asked for
    assert report["timings_seconds"] == {"proposals": 40.0, "pretrain/byol": 300.0, "pretrain/soco": 200.0,
                                         "finetune/full/soco/seed0": 100.0}
    assert report["probe"] == {"c5": {"byol": _score(0.8), "random init": _score(0.55)},
                               "c4": {"soco": _score(0.7), "random init": _score(0.6)}}


def _report_with(study, reports, *options):
    assert main(["study", "--out", str(study), "--report", str(reports), "--report-only", *options]) == 0
    return (reports / "study_cpu.md").read_text(), json.loads((reports / "study_cpu.json").read_text())
