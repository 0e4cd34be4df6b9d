"""benchmarks/gpu_check.sh and gpu_check.py without a GPU: they skip cleanly; the report merges a GPU run's files."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TIMING = ROOT / "benchmarks" / "gpu_check.py"

on_a_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="with CUDA the script runs the real checks for minutes: run it directly")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", TIMING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@on_a_gpu
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.timeout(60)
def test_the_script_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, check=False, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "OUT": str(out), "SOCO_GPU_CHECK_SKIP_INSTALL": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cuda"] is False and report["passed"] is True and report["failed"] == []
    assert report["skipped"] == ["install", "cuda_tests", "bench_data", "bench_batch_64", "bench_batch_128"]
    assert report["checks"]["cuda_probe"]["status"] == "passed"
    assert report["checks"]["cuda_probe"]["log"] == "gpu_check_logs/cuda_probe.log"
    assert report["checks"]["cuda_tests"]["note"] == "no CUDA device"
    assert report["environment"]["torch"] == torch.__version__
    assert report["figures"] == {} and 0 < report["wall_seconds"] < 60
    assert "cuda: false" in result.stdout


@pytest.mark.slow
@on_a_gpu
@pytest.mark.timeout(60)
def test_timing_without_cuda_says_so_in_one_line_and_writes_the_skipped_list(tmp_path):
    path = tmp_path / "timing.json"
    result = subprocess.run([sys.executable, str(TIMING), "--json", str(path)], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"no CUDA device: skipped data_loader_16_workers, soco_r50_fpn_batch_64, soco_r50_fpn_batch_128 (wrote {path})"
    ]
    written = json.loads(path.read_text())
    assert written["cuda"] is False
    assert written["skipped"] == ["data_loader_16_workers", "soco_r50_fpn_batch_64", "soco_r50_fpn_batch_128"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.gpu.test_cuda" name="test_a_step_on_cuda_trains_in_reduced_precision[bf16-dtype0]"
 time="2.5"/>
<testcase classname="tests.gpu.test_cuda" name="test_two_gpus_train_in_step_with_sync_bn_over_nccl" time="0.0">
<skipped type="pytest.skip" message="needs two GPUs"/></testcase>
<testcase classname="tests.gpu.test_cuda" name="test_resume_after_a_kill_on_cuda_continues_the_run[fp16]"
 time="20.25"><failure message="AssertionError: encoder: 0.5 from the whole run">long trace</failure></testcase>
</testsuite></testsuites>
"""


def test_the_report_merges_the_steps_tests_and_figures_of_a_gpu_run(tmp_path):
    gpu_check = load_gpu_check()
    out, logs = tmp_path, tmp_path / "gpu_check_logs"
    logs.mkdir()
    rows = [("install", "skipped", "", "0", "", "", ".venv already works: reused"),
            ("cuda_probe", "passed", "0", "4.2", "60", str(logs / "cuda_probe.log"), ""),
            ("cuda_tests", "failed", "1", "95.5", "170", str(logs / "cuda_tests.log"), ""),
            ("bench_data", "passed", "0", "41.0", "100", str(logs / "bench_data.log"), ""),
            ("bench_batch_64", "passed", "0", "30.0", "70", str(logs / "bench_batch_64.log"), ""),
            ("bench_batch_128", "timed out", "124", "80.0", "80", str(logs / "bench_batch_128.log"), "")]
    (logs / "steps.tsv").write_text("".join("\t".join(row) + "\n" for row in rows))
    (logs / "cuda_tests.xml").write_text(JUNIT)
    (logs / "environment.json").write_text(json.dumps({"cuda": True, "gpus": [{"name": "NVIDIA H200"}]}))
    (logs / "bench_data.json").write_text(json.dumps(
        {"cuda": True, "config": "soco_r50_fpn", "data_loader": {"workers": 16, "images_per_second": 900.0}}))
    (logs / "bench_batch_64.json").write_text(json.dumps({"cuda": True, "config": "soco_r50_fpn", "model_step": {
        "64": {"images_per_second": 1200.0, "peak_memory_mib": 30000.0, "precision": "bf16"}}}))
    (logs / "bench_batch_128.json.partial").write_text("{")  # the timed-out step wrote nothing whole

    report = gpu_check.build_report(logs, out, wall_seconds=251.0)

    assert report["cuda"] is True and report["passed"] is False
    assert report["failed"] == ["cuda_tests", "bench_batch_128"] and report["skipped"] == ["install"]
    assert report["checks"]["bench_batch_128"] == {"status": "timed out", "exit_code": 124, "seconds": 80.0,
                                                   "time_limit_s": 80, "log": "gpu_check_logs/bench_batch_128.log",
                                                   "note": None}
    tests = report["checks"]["cuda_tests"]["tests"]
    assert [case["status"] for case in tests.values()] == ["passed", "skipped", "failed"]
    failed = tests["tests.gpu.test_cuda::test_resume_after_a_kill_on_cuda_continues_the_run[fp16]"]
    assert failed == {"status": "failed", "seconds": 20.25, "message": "AssertionError: encoder: 0.5 from the whole run"}
    step = report["figures"]["soco_r50_fpn"]["batch_64"]
    assert step["images_per_second"] == 1200.0 and step["data_keeps_up"] is False  # 900 images/s < 1200
    assert report["figures"]["data_loader"]["workers"] == 16 and "batch_128" not in report["figures"]["soco_r50_fpn"]
    assert report["checks_seconds"] == pytest.approx(250.7) and report["wall_seconds"] == 251.0
    lines = gpu_check.summary_lines(report)
    assert lines[0] == "cuda: true; failed: cuda_tests, bench_batch_128 in 251 s"
    assert "  soco_r50_fpn batch_64: 1200.0 images/s, peak 30000 MiB (bf16)" in lines
