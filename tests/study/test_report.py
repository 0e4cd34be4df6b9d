"""The study report: seed statistics, gaps against twice the spread, the table and the plot, from run folders."""

import json
import statistics

import pytest

from soco.errors import ConfigError
from soco.study.report import (ArmSummary, Gap, collect_runs, comparison_table, gap, markdown_table, plot_study,
                               runs_from_report, summaries_from_report, summarise)


def _write_run(study, reading, arm, seed, ap, curve=((2, 0.01),), finished=True):
    folder = study / "finetune" / reading / arm / f"seed{seed}"
    folder.mkdir(parents=True)
    history = [{"epoch": e, "loss": 1.0, "val": {"bbox": {"AP": a, "AP50": 2 * a}}} for e, a in curve]
    history.append({"epoch": 4, "loss": 0.5})
    metrics = {"finished": finished, "epochs_done": 4, "history": history,
               "bbox": {"AP": ap, "AP50": min(1.0, 2 * ap)} if finished else None}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_gap_is_judged_against_twice_the_larger_seed_spread():
    soco = ArmSummary("soco", "full", [0, 1, 2], [10.0, 12.0, 14.0], [20.0, 22.0, 24.0])
    scratch = ArmSummary("scratch", "full", [0, 1, 2], [5.0, 5.5, 6.0], [10.0, 11.0, 12.0])
    result = gap(soco, scratch)
    assert result.difference == pytest.approx(12.0 - 5.5)
    assert result.threshold == pytest.approx(2 * 2.0)  # stdev(10, 12, 14) = 2 > stdev(5, 5.5, 6) = 0.5
    assert result.exceeds is True and result.text() == "+6.50 (> 2σ = 4.00)"
    close = ArmSummary("byol", "full", [0, 1, 2], [9.0, 11.0, 13.0], [0.0, 0.0, 0.0])
    assert gap(soco, close).exceeds is False and gap(soco, close).text() == "+1.00 (within 2σ = 4.00)"
    one_seed = ArmSummary("detco", "full", [0], [30.0], [40.0])
    assert gap(one_seed, soco).exceeds is None and gap(one_seed, soco).text() == "seeds 0: +20.00 (spread unknown)"
    # different seed sets: only the seeds both arms have are compared (seed 2 of soco is left out)
    two_seeds = ArmSummary("insloc", "full", [0, 1], [11.0, 12.0], [0.0, 0.0])
    paired = gap(two_seeds, soco)
    assert paired.difference == pytest.approx(11.5 - 11.0) and paired.threshold == pytest.approx(2 * 2 ** 0.5)
    assert paired.text() == "seeds 0, 1: +0.50 (within 2σ = 2.83)"
    assert Gap(-3.0, 2.0).exceeds is True


def test_collect_and_summarise_read_finished_runs_only(tmp_path):
    for seed, ap in enumerate((0.10, 0.12, 0.14)):
        _write_run(tmp_path, "full", "soco", seed, ap, curve=((2, ap / 2),))
    for seed, ap in enumerate((0.05, 0.06)):
        _write_run(tmp_path, "full", "scratch", seed, ap)
    _write_run(tmp_path, "frozen", "scratch", 0, 0.01)
    _write_run(tmp_path, "full", "detco", 0, 0.3, finished=False)
    runs = collect_runs(tmp_path)
    assert sorted((r.reading, r.arm, r.seed) for r in runs) == [
        ("frozen", "scratch", 0), ("full", "scratch", 0), ("full", "scratch", 1),
        ("full", "soco", 0), ("full", "soco", 1), ("full", "soco", 2)]
    soco_run = next(r for r in runs if r.arm == "soco" and r.seed == 1)
    assert soco_run.ap == pytest.approx(12.0) and soco_run.curve == [(2, pytest.approx(6.0)), (4, pytest.approx(12.0))]
    summaries = summarise(runs)
    # full before frozen; scratch before soco (the design's order)
    assert [(s.reading, s.arm) for s in summaries] == [("full", "scratch"), ("full", "soco"), ("frozen", "scratch")]
    assert summaries[1].ap_mean == pytest.approx(12.0)
    assert summaries[1].ap_std == pytest.approx(statistics.stdev([10.0, 12.0, 14.0]))
    assert summaries[2].ap_std is None
    table = markdown_table(summaries)
    # scratch has seeds 0 and 1 only: the gap pairs soco's 10, 12 with scratch's 5, 6
    assert ("| soco | 3 | 12.00 ± 2.00 | 24.00 ± 4.00 | 10.0, 12.0, 14.0 | seeds 0, 1: +5.50 (> 2σ = 2.83) |  |"
            in table)
    assert "| scratch | 1 | 1.00 ± — |" in table
    assert "| 5.0, 6.0 |  |" in table  # scratch (seeds 0, 1) is itself the scratch reference


def test_plot_writes_a_png_with_the_length_panel(tmp_path):
    for arm, base in (("scratch", 0.02), ("soco", 0.05), ("soco@2", 0.03)):
        for seed in (0, 1):
            _write_run(tmp_path, "full", arm, seed, base + 0.01 * seed, curve=((2, base / 2),))
    path = plot_study(collect_runs(tmp_path), tmp_path / "study.png", main_steps=8, title="tiny")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_study([], tmp_path / "none.png", main_steps=8) is None


def test_report_only_rewrites_the_report_naming_the_command_that_ran_the_study(tmp_path, capsys):
    from soco.cli.main import main

    study, reports = tmp_path / "study", tmp_path / "reports"
    _write_run(study, "full", "scratch", 0, 0.05)
    (study / "soco-study.json").write_text(json.dumps({"data": "tiles"}))
    reports.mkdir()
    (reports / "study_cpu.json").write_text(json.dumps({"command": "soco study --out study --seeds 0",
                                                        "revision": "abc1234", "machine": "9 CPU cores (z80)"}))
    assert main(["study", "--out", str(study), "--report", str(reports), "--report-only"]) == 0
    markdown = (reports / "study_cpu.md").read_text()
    assert "`soco study --out study --seeds 0`" in markdown and "--report-only" not in markdown
    # the commit and machine of the call that ran the runs, not of this one
    assert "soco abc1234." in markdown and "on 9 CPU cores (z80);" in markdown
    assert "| scratch | 1 | 5.00 ± — |" in markdown
    assert json.loads((reports / "study_cpu.json").read_text())["command"] == "soco study --out study --seeds 0"


def test_comparison_table_gives_each_arm_then_and_now_and_judges_the_change():
    before = [ArmSummary("scratch", "full", [0, 1, 2], [2.0, 2.5, 3.0], [9.0, 9.0, 9.0]),
              ArmSummary("soco", "full", [0, 1, 2], [4.0, 4.5, 5.0], [9.0, 9.0, 9.0])]
    after = [ArmSummary("scratch", "full", [0, 1, 2], [2.0, 2.5, 3.0], [9.0, 9.0, 9.0]),
             ArmSummary("soco", "full", [0, 1, 2], [6.0, 6.5, 7.0], [9.0, 9.0, 9.0]),
             ArmSummary("byol", "full", [0, 1, 2], [3.0, 3.0, 3.0], [9.0, 9.0, 9.0])]
    table = comparison_table(before, after, "old")
    lines = table.splitlines()
    assert lines[0] == "**full** fine-tuning: old against now"
    assert "| scratch | 2.50 ± 0.50 | 2.50 ± 0.50 | +0.00 (within 2σ = 1.00) |" in lines
    # soco moved by 2.0 against twice the larger spread (0.5 both times): a real change
    assert "| soco | 4.50 ± 0.50 | 6.50 ± 0.50 | +2.00 (> 2σ = 1.00) |" in lines
    assert "| byol | — | 3.00 ± 0.00 |  |" in lines  # a new arm: nothing to compare
    # arms in the design's order (byol, the new arm, ranks before soco)
    arms = [line.split(" | ")[0][2:] for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert arms.index("scratch") < arms.index("byol") < arms.index("soco")


def test_summaries_from_report_reads_a_report_and_names_a_wrong_file():
    report = {"rows": [{"arm": "soco", "reading": "frozen", "seeds": [0, 1], "ap_per_seed": [1.0, 3.0],
                        "ap50_per_seed": [2.0, 4.0], "ap_mean": 2.0, "ap_std": 1.4}]}
    (summary,) = summaries_from_report(report)
    assert (summary.arm, summary.reading, summary.ap_mean, summary.ap50_mean) == ("soco", "frozen", 2.0, 3.0)
    with pytest.raises(ConfigError, match="old.json: not a study report"):
        summaries_from_report({"budget": "cpu"}, "old.json")
    with pytest.raises(ConfigError, match="old.json: a row or curve lacks 'seeds'"):
        summaries_from_report({"rows": [{"arm": "soco", "reading": "full", "ap_per_seed": [1.0]}]}, "old.json")


def test_runs_from_report_reads_each_seed_with_its_curve_and_names_a_bad_row():
    report = {"rows": [{"arm": "soco", "reading": "full", "seeds": [0, 2], "ap_per_seed": [1.5, 2.5],
                        "ap50_per_seed": [4.0, 6.0]},
                       {"arm": "scratch", "reading": "full", "seeds": [1], "ap_per_seed": [0.5]}],  # no AP50 kept
              "curves": [{"arm": "soco", "reading": "full", "seed": 2, "curve": [[1, 1.0], [2, 2.5]]}]}
    runs = runs_from_report(report, "part.json")
    assert [(r.arm, r.seed, r.ap, r.ap50, r.curve) for r in runs] == [
        ("soco", 0, 1.5, 4.0, []), ("soco", 2, 2.5, 6.0, [(1, 1.0), (2, 2.5)]), ("scratch", 1, 0.5, 0.5, [])]
    report["rows"][0]["ap_per_seed"] = [1.5]
    with pytest.raises(ConfigError, match="part.json: row soco full has 2 seeds but 1 AP values"):
        runs_from_report(report, "part.json")


def test_report_compares_with_an_earlier_study(tmp_path, capsys):
    from soco.cli.main import main

    study, reports = tmp_path / "study", tmp_path / "reports"
    for seed, ap in enumerate((0.05, 0.06)):
        _write_run(study, "full", "scratch", seed, ap)
    (study / "soco-study.json").write_text(json.dumps({"data": "tiles"}))
    earlier = tmp_path / "study_cpu_before.json"
    earlier.write_text(json.dumps({"rows": [{"arm": "scratch", "reading": "full", "seeds": [0, 1],
                                             "ap_per_seed": [1.0, 2.0], "ap50_per_seed": [2.0, 4.0]}]}))
    assert main(["study", "--out", str(study), "--report", str(reports), "--report-only",
                 "--compare-to", str(earlier)]) == 0
    markdown = (reports / "study_cpu.md").read_text()
    assert "## Against an earlier study: `study_cpu_before.json`" in markdown
    # 5.5 now against 1.5 then; spreads 0.707 both: the change exceeds 2σ = 1.41
    assert "| scratch | 1.50 ± 0.71 | 5.50 ± 0.71 | +4.00 (> 2σ = 1.41) |" in markdown
    capsys.readouterr()
    assert main(["study", "--out", str(study), "--report-only", "--compare-to", str(tmp_path / "missing.json")]) != 0
    error = capsys.readouterr().err
    assert "--compare-to: " in error and "missing.json is not a file" in error
