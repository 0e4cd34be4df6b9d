"""The GPU check's timing and report: `soco_r50_fpn` step images/s and peak memory, the data loader's rate.

    python benchmarks/gpu_check.py [--batch-size 64 128] [--workers 16] [--only model|data] [--json FILE]
    python benchmarks/gpu_check.py probe --json FILE      # what this machine has (CUDA, GPUs, versions)
    python benchmarks/gpu_check.py report --logs DIR --json FILE   # gpu_check.sh's one JSON (stdlib only)

The step is timed with `soco bench`'s own function (`soco.engine.bench.time_model_steps`: the trainer's
StepRunner, `train.precision=auto`, i.e. bf16 on a GPU) on a batch of the default photos with their
proposals; the data loader is the trainer's (RunBatchSampler across epochs, pinned memory) with N workers.
Without CUDA it prints one line, writes {"cuda": false, "skipped": [...]} and exits 0.
`benchmarks/gpu_check.sh` runs everything (install, CUDA tests, these timings) under time limits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from xml.etree import ElementTree

DEFAULT_OUT = Path(os.environ.get("OUT") or "benchmarks/results")
DEFAULT_CONFIG = "soco_r50_fpn"
DEFAULT_BATCH_SIZES = (64, 128)
DEFAULT_WORKERS = 16

# gpu_check.sh's sub-steps, in the order it runs them; the report names every one, run or not.
STEP_NAMES = ("install", "cuda_probe", "cuda_tests", "bench_data", "bench_batch_64", "bench_batch_128")


# ---------------------------------------------------------------- probe


def probe() -> dict:
    """This machine's Python, torch, CUDA, cuDNN, NCCL and GPUs (everything JSON-ready)."""
    import torch

    import soco

    found = {
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "soco": soco.__version__,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if found["cuda"]:
        found["cudnn"] = torch.backends.cudnn.version()
        nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
        found["nccl"] = ".".join(str(part) for part in nccl) if isinstance(nccl, tuple) else nccl
        found["gpus"] = [
            {"name": props.name, "memory_mib": props.total_memory // 2**20,
             "capability": f"{props.major}.{props.minor}"}
            for props in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
        ]
        found["bf16_supported"] = torch.cuda.is_bf16_supported()
        found["driver"] = nvidia_smi_driver()
    return found


def nvidia_smi_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None when it cannot be asked."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


# ---------------------------------------------------------------- timing


def view_stacks(batch) -> int:
    """How many image stacks (floating tensors of 4 or more axes) a collated batch holds: views per image."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.ndim >= 4 and batch.is_floating_point())
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return sum(view_stacks(value) for value in values)


def trainer_loader(dataset, batch_size: int, workers: int, batches: int, seed: int, pin_memory: bool):
    """A DataLoader built as the trainer builds it: one loader across epochs, (epoch, index) keys."""
    import torch

    from soco.engine.sampler import RunBatchSampler, batches_per_epoch

    per_epoch = batches_per_epoch(len(dataset), batch_size, 1)
    sampler = RunBatchSampler(len(dataset), batch_size, seed, 0, 1, batches_used_per_epoch=per_epoch,
                              start_batch=0, total_batches=batches)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=dataset.collate, pin_memory=pin_memory,
        prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(seed),
    )


def time_loader(dataset, batch_size: int, workers: int, timed_batches: int, seed: int, pin_memory: bool) -> dict:
    """Images/s and views/s of the trainer's loader once every worker has delivered its first batch."""
    # The first round of batches was made while the clock waited for the first one: counting them
    # would credit start-up work to the steady rate.
    warm = max(1, workers)
    loader = trainer_loader(dataset, batch_size, workers, warm + timed_batches, seed, pin_memory)
    started_at = time.perf_counter()
    iterator = iter(loader)
    views = 0
    for _ in range(warm):
        views = view_stacks(next(iterator))
    first_round_seconds = time.perf_counter() - started_at
    started, images = time.perf_counter(), 0
    for batch in iterator:
        images += len(batch["paths"])
    seconds = time.perf_counter() - started
    rate = images / seconds if seconds > 0 else 0.0
    return {"workers": workers, "batch_size": batch_size, "images": images, "seconds": seconds,
            "images_per_second": rate, "views_per_image": views, "views_per_second": rate * views,
            "images_per_second_per_worker": rate / max(1, workers), "first_round_seconds": first_round_seconds,
            "dataset_images": len(dataset), "pin_memory": pin_memory}


def first_batch_by_workers(dataset, batch_size: int, workers: int) -> dict:
    """`soco bench`'s first batch (the first `batch_size` images, epoch 0), its samples made by `workers` processes."""
    import torch

    # one worker per few samples: in the main process a batch of 128 large photos takes a minute
    positions = [i % len(dataset) for i in range(batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=positions, num_workers=workers,
                                         collate_fn=list)
    return dataset.collate([sample for chunk in loader for sample in chunk])


def time_step(config, dataset, device, steps: int, warmup: int, workers: int) -> dict:
    """`soco bench`'s timing of the trainer's step on the data set's first batch, plus reserved memory."""
    import torch

    from soco.engine.bench import time_model_steps
    from soco.engine.step import resolve_precision, smallest_view_side

    batch_size = config.train.batch_size
    batch = first_batch_by_workers(dataset, batch_size, workers)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result = time_model_steps(config, batch, steps, warmup, device)
    except torch.OutOfMemoryError as error:
        return {"batch_size": batch_size, "error": f"out of memory: {str(error).splitlines()[0]}"}
    result["precision"] = resolve_precision(config.train.precision, device, smallest_view_side(batch))
    result["channels_last"] = config.train.channels_last
    if device.type == "cuda":
        result["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return result


def run_timing(args: argparse.Namespace) -> dict:
    """Every timing asked for, as one JSON-ready dict (or the skip record without CUDA)."""
    import torch

    parts = [f"data_loader_{args.workers}_workers"] if args.only != "model" else []
    parts += [f"{args.config}_batch_{size}" for size in args.batch_size] if args.only != "data" else []
    if args.device == "cuda" and not torch.cuda.is_available():
        return {"cuda": False, "skipped": parts, "reason": "no CUDA device", "torch": torch.__version__}

    from soco.cli.pretrain_command import resolve_data
    from soco.config.loading import load_config
    from soco.engine.bench import bench_dataset

    device = torch.device(args.device)
    result = {"cuda": device.type == "cuda", "device": device.type, "config": args.config, "skipped": [],
              "overrides": args.overrides, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    base = load_config(args.config, [f"train.device={args.device}", *args.overrides])
    images_root, store = resolve_data(base, None, quiet=True)
    result["images_root"] = str(images_root)
    if args.only != "model":
        dataset = bench_dataset(base, images_root, store)
        result["data_loader"] = time_loader(dataset, args.data_batch_size, args.workers, args.data_batches,
                                            base.train.seed, pin_memory=device.type == "cuda")
        print(f"data loader, {args.workers} workers: {result['data_loader']['images_per_second']:.0f} images/s",
              flush=True)
    if args.only != "data":
        result["model_step"] = {}
        for size in args.batch_size:
            config = load_config(args.config, [f"train.device={args.device}", f"train.batch_size={size}",
                                               *args.overrides])
            dataset = bench_dataset(config, images_root, store)
            timing = time_step(config, dataset, device, args.steps, args.warmup, args.workers)
            result["model_step"][str(size)] = timing
            if "error" in timing:
                print(f"{args.config} batch {size}: {timing['error']}", flush=True)
            else:
                print(f"{args.config} batch {size}: {timing['images_per_second']:.1f} images/s, "
                      f"peak {timing['peak_memory_mib']:.0f} MiB", flush=True)
    return result


# ---------------------------------------------------------------- report


def read_steps(logs: Path) -> dict[str, dict]:
    """gpu_check.sh's steps.tsv: name, status, exit code, seconds, time limit, log file, note; by name."""
    steps = {}
    path = logs / "steps.tsv"
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 6:
            continue
        name, status, code, seconds, limit, log = fields[:6]
        steps[name] = {"status": status, "exit_code": int(code) if code.lstrip("-").isdigit() else None,
                       "seconds": float(seconds) if seconds else None,
                       "time_limit_s": int(limit) if limit.isdigit() else None,
                       "log": log or None, "note": fields[6] if len(fields) > 6 and fields[6] else None}
    return steps


def read_junit(path: Path) -> dict[str, dict]:
    """Each test of a pytest --junitxml file: passed, failed, error or skipped, its seconds and message."""
    if not path.is_file():
        return {}
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return {}
    cases = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        status, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                first_lines = (element.get("message") or element.text or "").strip().splitlines()
                message = first_lines[0][:300] if first_lines else None
                break
        cases[name] = {"status": status, "seconds": float(case.get("time") or 0.0), "message": message}
    return cases


def read_json(path: Path) -> dict | None:
    """A JSON file written by a sub-step, or None when it is missing or cut short."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def git_commit() -> str | None:
    """The checked-out commit, with '+changes' when the working tree differs from it; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                                timeout=10)
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False,
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


def build_report(logs: Path, out_dir: Path, wall_seconds: float | None = None) -> dict:
    """gpu_check.sh's one JSON: every sub-check's status and seconds, every figure, the environment."""
    steps = read_steps(logs)
    checks = {}
    for name in STEP_NAMES:
        checks[name] = steps.get(name, {"status": "not run", "exit_code": None, "seconds": None,
                                        "time_limit_s": None, "log": None, "note": None})
    for name, step in steps.items():  # a step the script added later is still reported
        checks.setdefault(name, step)
    for check in checks.values():
        if check.get("log"):
            check["log"] = os.path.relpath(check["log"], out_dir)
    cases = read_junit(logs / "cuda_tests.xml")
    if cases:
        checks["cuda_tests"]["tests"] = cases
        # a test that fails inside a passing pytest run cannot happen, but a crash after the XML can
        if any(case["status"] in ("failed", "error") for case in cases.values()):
            checks["cuda_tests"]["status"] = "failed"

    environment = read_json(logs / "environment.json") or {}
    figures: dict = {}
    data = read_json(logs / "bench_data.json")
    if data and data.get("data_loader"):
        figures["data_loader"] = {**data["data_loader"], "images_root": data.get("images_root")}
    for size in (64, 128):
        timing = read_json(logs / f"bench_batch_{size}.json")
        step = (timing or {}).get("model_step", {}).get(str(size))
        if not step:
            continue
        name = f"bench_batch_{size}"
        if "error" in step and checks[name]["status"] == "passed":
            checks[name]["status"], checks[name]["note"] = "failed", step["error"]
        figures.setdefault(timing.get("config", DEFAULT_CONFIG), {})[f"batch_{size}"] = step
        if "data_loader" in figures and "images_per_second" in step:
            step["data_keeps_up"] = figures["data_loader"]["images_per_second"] >= step["images_per_second"]

    statuses = {name: check["status"] for name, check in checks.items()}
    failed = [name for name, status in statuses.items() if status in ("failed", "timed out")]
    return {
        "cuda": bool(environment.get("cuda", False)),
        "passed": not failed,
        "failed": failed,
        "skipped": [name for name, status in statuses.items() if status in ("skipped", "not run")],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds,
        "checks_seconds": sum(check["seconds"] or 0.0 for check in checks.values()),
        "commit": git_commit(),
        "environment": environment,
        "checks": checks,
        "figures": figures,
    }


def summary_lines(report: dict) -> list[str]:
    """The report in a few lines for the terminal."""
    wall = f" in {report['wall_seconds']:.0f} s" if report.get("wall_seconds") is not None else ""
    lines = [f"cuda: {str(report['cuda']).lower()}; "
             + ("all checks passed or skipped" if report["passed"] else f"failed: {', '.join(report['failed'])}")
             + wall]
    for name, check in report["checks"].items():
        seconds = f"{check['seconds']:.1f} s" if check.get("seconds") is not None else "-"
        note = f" ({check['note']})" if check.get("note") else ""
        lines.append(f"  {name:<16} {check['status']:<10} {seconds}{note}")
        for test, case in check.get("tests", {}).items():
            if case["status"] != "passed":
                lines.append(f"    {case['status']}: {test}: {case['message'] or ''}")
    for config, by_batch in report["figures"].items():
        if config == "data_loader":
            lines.append(f"  data loader ({by_batch['workers']} workers): {by_batch['images_per_second']:.0f} images/s")
            continue
        for batch, step in by_batch.items():
            if "images_per_second" in step:
                lines.append(f"  {config} {batch}: {step['images_per_second']:.1f} images/s, "
                             f"peak {step['peak_memory_mib']:.0f} MiB ({step.get('precision')})")
    return lines


# ---------------------------------------------------------------- command line


def write_json(value: dict, path: Path) -> None:
    """Write JSON through a temporary file, so that a killed step never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    """`probe`, `report`, or (no sub-command) the timings."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        parser = argparse.ArgumentParser(prog="gpu_check.py probe", description="what this machine has")
        parser.add_argument("--json", type=Path, required=True)
        args = parser.parse_args(argv[1:])
        found = probe()
        write_json(found, args.json)
        gpus = ", ".join(gpu["name"] for gpu in found.get("gpus", []))
        print(f"cuda: {str(found['cuda']).lower()}; torch {found['torch']}" + (f"; {gpus}" if gpus else ""))
        return 0
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="gpu_check.py report", description="assemble gpu_check.json")
        parser.add_argument("--logs", type=Path, required=True, help="gpu_check.sh's log folder")
        parser.add_argument("--json", type=Path, required=True)
        parser.add_argument("--wall-seconds", type=float, default=None, help="the whole check's wall time")
        args = parser.parse_args(argv[1:])
        report = build_report(args.logs, args.json.parent, args.wall_seconds)
        write_json(report, args.json)
        print("\n".join(summary_lines(report)))
        print(f"written: {args.json}")
        return 0

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"preset to time (default {DEFAULT_CONFIG})")
    parser.add_argument("--batch-size", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                        help="step batch sizes to time (default 64 128)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="data-loader workers (default 16)")
    parser.add_argument("--data-batch-size", type=int, default=64, help="batch of the loader timing (default 64)")
    parser.add_argument("--data-batches", type=int, default=48, help="timed loader batches (default 48)")
    parser.add_argument("--only", choices=["model", "data"], default=None, help="time only the step or the loader")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default; skipped without CUDA) or cpu, to try the script with a tiny preset")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT / "gpu_timing.json", help="where to write")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    args = parser.parse_args(argv)
    import soco  # noqa: F401  (its thread settings apply before torch starts)

    result = run_timing(args)
    write_json(result, args.json)
    if not result["cuda"] and result["skipped"]:
        print(f"no CUDA device: skipped {', '.join(result['skipped'])} (wrote {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
