"""`soco bench`: images/s and peak memory of the trainer's own step, and of data loading, measured apart."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from soco.config.loading import config_to_dict
from soco.config.schema import Config
from soco.data.dataset import ImageDataset
from soco.engine.distributed import DistributedContext, resolve_device
from soco.engine.optimizers import build_optimizer
from soco.engine.step import StepRunner, resolve_precision, smallest_view_side
from soco.engine.trainer import build_dataset, build_model, peak_memory_mib, resolve_loader_workers


def time_data_loading(dataset: ImageDataset, batch_size: int, workers: int, batches: int) -> dict:
    """Images/s of the data pipeline alone (decode, the method's transform, collate), after workers start."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=dataset.collate,
        drop_last=True, persistent_workers=False,
    )
    threads = torch.get_num_threads()
    if workers == 0:
        # in the main process on one thread, as a loader worker runs: the rate is then per core
        torch.set_num_threads(1)
    try:
        iterator = iter(loader)
        next(iterator)  # worker start-up is not throughput
        started, images = time.perf_counter(), 0
        for _ in range(batches):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            images += len(batch["paths"])
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    rate = images / seconds if seconds > 0 else 0.0
    return {"workers": workers, "images": images, "seconds": seconds, "images_per_second": rate,
            "images_per_second_per_core": rate / max(1, workers)}


def time_model_steps(config: Config, batch: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Images/s of the trainer's step (forward, backward, checks, optimiser, after-step work) on one batch."""
    torch.manual_seed(config.train.seed)
    context = DistributedContext(device=device)
    method = build_model(config, context)
    method.train()
    optimizer = build_optimizer(config.optim, method.parameter_groups(config.optim.weight_decay), lr=0.01)
    runner = StepRunner(method, method, optimizer, context, config.train.precision, config.train.channels_last)
    images = len(batch["paths"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings, total = [], warmup + steps
    for step in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        runner.run([batch], step, total, lr=0.01)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            timings.append(time.perf_counter() - started)
    timings.sort()
    median = timings[len(timings) // 2]
    cores = torch.get_num_threads() if device.type == "cpu" else None
    return {"steps": steps, "batch_size": images, "median_step_seconds": median,
            "images_per_second": images / median,
            "images_per_second_per_core": images / median / cores if cores else None,
            "peak_memory_mib": peak_memory_mib(device)}


def bench_dataset(config: Config, images_root: Path, store_dir: Path | None) -> ImageDataset:
    """The data set a configuration trains on (its method's transform)."""
    torch.manual_seed(config.train.seed)
    return build_dataset(build_model(config, DistributedContext()), images_root, store_dir, config.train.seed)


def first_batch(dataset: ImageDataset, batch_size: int) -> dict:
    """The first `batch_size` images of a data set as one collated batch."""
    return dataset.collate([dataset[i % len(dataset)] for i in range(batch_size)])


def run_bench(config: Config, images_root: Path, store_dir: Path | None, steps: int, warmup: int,
              data_batches: int, compare: tuple[str, Config] | None = None) -> dict:
    """All figures of `soco bench` as one JSON-ready dict; `compare` = (label, other config) times a second step."""
    device = resolve_device(config.train.device)
    dataset = bench_dataset(config, images_root, store_dir)
    workers = resolve_loader_workers(config.train.workers, DistributedContext(device=device))
    batch = first_batch(dataset, config.train.batch_size)
    result = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "method": config_to_dict(config.method),
        "precision": resolve_precision(config.train.precision, device, smallest_view_side(batch)),
        "channels_last": config.train.channels_last,
        "compile": config.train.compile,
        "data_main_process": time_data_loading(dataset, config.train.batch_size, 0, data_batches),
    }
    if workers > 0:
        result["data_workers"] = time_data_loading(dataset, config.train.batch_size, workers, data_batches)
    result["model_step"] = time_model_steps(config, batch, steps, warmup, device)
    if compare is not None:
        label, other = compare
        # the compared configuration's own batch: a change of the views changes what the step eats
        other_batch = first_batch(bench_dataset(other, images_root, store_dir), other.train.batch_size)
        result["compared"] = {"change": label, **time_model_steps(other, other_batch, steps, warmup, device)}
        result["speedup_of_configured_over_compared"] = (
            result["model_step"]["images_per_second"] / result["compared"]["images_per_second"])
    loader_rate = result.get("data_workers", result["data_main_process"])["images_per_second"]
    result["data_keeps_up"] = loader_rate >= result["model_step"]["images_per_second"]
    return result
