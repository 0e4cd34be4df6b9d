"""`soco bench`: images/s and peak memory of training steps, data loading and model time separately."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from soco.config.schema import Config
from soco.data.dataset import SoCoDataset, collate_views
from soco.data.proposals.store import ProposalStore
from soco.engine.distributed import DistributedContext, resolve_device
from soco.engine.lars import LARS, lars_param_groups
from soco.engine.trainer import _batch_to_device, apply_gradients, autocast_context, build_model, peak_memory_mib, resolve_loader_workers


def time_data_loading(dataset: SoCoDataset, batch_size: int, workers: int, batches: int) -> dict:
    """Images/s of the data pipeline alone (decode, views, colour), after the workers have started."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_views,
        drop_last=True, persistent_workers=False,
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        images += len(batch["indices"])
    seconds = time.perf_counter() - started
    rate = images / seconds if seconds > 0 else 0.0
    return {"workers": workers, "images": images, "seconds": seconds, "images_per_second": rate,
            "images_per_second_per_worker": rate / max(1, workers)}


def time_model_steps(config: Config, batch: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Images/s of full training steps (forward, backward, LARS, EMA) on one fixed batch."""
    torch.manual_seed(config.train.seed)
    context = DistributedContext(device=device)
    model = build_model(config, context)
    model.train()
    optimizer = LARS(lars_param_groups(model, config.optim.weight_decay), lr=0.01,
                     weight_decay=config.optim.weight_decay)
    autocast, scaler = autocast_context(config.train.precision, device)
    views, boxes = _batch_to_device(batch, device)
    images = next(iter(views.values())).shape[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with autocast:
            loss = model(views, boxes)
        (scaler.scale(loss) if scaler else loss).backward()
        apply_gradients(optimizer, scaler)
        model.update_target(0.99)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            timings.append(time.perf_counter() - started)
    timings.sort()
    median = timings[len(timings) // 2]
    return {"steps": steps, "batch_size": images, "median_step_seconds": median,
            "images_per_second": images / median, "peak_memory_mib": peak_memory_mib(device),
            "pool_all_levels": config.model.pool_all_levels}


def run_bench(config: Config, images_root: Path, store_dir: Path, steps: int, warmup: int,
              data_batches: int, compare_pooling: bool) -> dict:
    """All figures of `soco bench` as one JSON-ready dict."""
    device = resolve_device(config.train.device)
    dataset = SoCoDataset(images_root, ProposalStore(store_dir), config.views, seed=config.train.seed)
    workers = resolve_loader_workers(config.train.workers, DistributedContext(device=device))
    batch = collate_views([dataset[i % len(dataset)] for i in range(config.train.batch_size)])
    result = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "model": dataclasses.asdict(config.model),
        "views": {k: getattr(config.views, k) for k in ("v1_size", "v2_size", "v3_size", "v4_size", "use_v3", "use_v4",
                                                         "proposals_per_image")},
        "precision": config.train.precision,
        "data_main_process": time_data_loading(dataset, config.train.batch_size, 0, data_batches),
    }
    if workers > 0:
        result["data_workers"] = time_data_loading(dataset, config.train.batch_size, workers, data_batches)
    result["model_step"] = time_model_steps(config, batch, steps, warmup, device)
    if compare_pooling:
        other = dataclasses.replace(config, model=dataclasses.replace(config.model, pool_all_levels=not config.model.pool_all_levels))
        result["model_step_other_pooling"] = time_model_steps(other, batch, steps, warmup, device)
        per_level = result["model_step"] if not config.model.pool_all_levels else result["model_step_other_pooling"]
        all_level = result["model_step_other_pooling"] if not config.model.pool_all_levels else result["model_step"]
        result["per_level_speedup"] = per_level["images_per_second"] / all_level["images_per_second"]
    loader_rate = result.get("data_workers", result["data_main_process"])["images_per_second"]
    result["data_keeps_up"] = loader_rate >= result["model_step"]["images_per_second"]
    return result
