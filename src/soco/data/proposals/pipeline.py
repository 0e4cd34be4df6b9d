"""`soco proposals`: selective search over an image folder, parallel, sharded and resumable.

Work goes to STORE/parts/: `run.json` (what the run is: image folder, its listing, algorithm, filter,
shard count) and one append-only log per shard. A killed run reopens its log and computes only the
images not in it. When every shard's log is complete the logs are merged into the finished store.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import soco
from soco.config.schema import ProposalsConfig
from soco.data.images import decode_rgb, file_fingerprint, list_images
from soco.data.proposals.filter import FilterRules, filter_proposals
from soco.data.proposals.selective_search import get_algorithm
from soco.data.proposals.store import (
    FAILED_LEVEL,
    ImageRecord,
    ProposalStore,
    is_store,
    listing_digest,
    write_store,
)
from soco.data.proposals.worklog import WorkLog, read_log
from soco.errors import DataError, ImageReadError, ProposalStoreError
from soco.files import atomic_write_text

PARTS_DIR = "parts"
RUN_FILE = "run.json"
SYNC_EVERY_SECONDS = 10.0
FALLBACK_NAMES = {1: "aspect-only", 2: "size-only", 3: "whole-image"}


@dataclass
class Shard:
    """Shard `index` of `count`: every count-th image of the sorted listing, starting at index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse 'I/N' (0 <= I < N)."""
        try:
            index_text, count_text = text.split("/")
            shard = cls(int(index_text), int(count_text))
        except ValueError:
            raise DataError(f"--shard '{text}' is not of the form I/N, e.g. 0/4") from None
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise DataError(f"--shard '{text}': need 0 <= I < N (shards are numbered from 0)")
        return shard

    def select(self, paths: list[str]) -> list[str]:
        """This shard's share of a sorted listing (interleaved, so shards get similar images)."""
        return paths[self.index :: self.count]

    def log_name(self) -> str:
        """File name of this shard's work log."""
        return f"shard-{self.index:05d}-of-{self.count:05d}.log"


@dataclass
class ProposalSummary:
    """What a proposal run did, printed at the end and written as summary.json."""

    images: int = 0
    computed_now: int = 0
    proposals: int = 0
    failures: int = 0
    fallbacks: dict = field(default_factory=dict)  # level name -> images
    seconds: float = 0.0
    images_per_second: float = 0.0
    store: str = ""
    finished: bool = False
    bytes_per_image: float = 0.0
    failed_images: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        per_image = self.proposals / max(1, self.images - self.failures)
        fallback_text = ", ".join(f"{k}: {v}" for k, v in self.fallbacks.items()) or "none"
        out = [
            f"images: {self.images} ({self.computed_now} computed now, {self.failures} failed)",
            f"proposals kept: {self.proposals} ({per_image:.1f} per image)",
            f"fallbacks: {fallback_text}",
            f"time: {self.seconds:.1f} s ({self.images_per_second:.2f} images/s this run)",
        ]
        for path, reason in list(self.failed_images.items())[:10]:
            out.append(f"failed: {path}: {reason}")
        if len(self.failed_images) > 10:
            out.append(f"... and {len(self.failed_images) - 10} more failures (see failures.json)")
        if self.finished:
            out.append(f"store: {self.store} ({self.bytes_per_image:.0f} bytes per image)")
        else:
            out.append("shard done; the store is finished when every shard is (or: soco proposals merge)")
        return out


def filter_rules(config: ProposalsConfig) -> FilterRules:
    """The filter thresholds of a proposals configuration."""
    return FilterRules(
        min_side=config.min_side,
        max_aspect=config.max_aspect,
        min_relative_scale=config.min_relative_scale,
        max_relative_scale=config.max_relative_scale,
    )


def run_identity(images_root: Path, paths: list[str], config: ProposalsConfig, shard_count: int) -> dict:
    """What a run is; a resumed or merged run must agree on all of it."""
    algorithm = get_algorithm(config.algorithm)
    return {
        "images_root": str(images_root),
        "num_images": len(paths),
        "listing_digest": listing_digest(paths),
        "algorithm": algorithm.name,
        "algorithm_params": algorithm.params,
        "filter": asdict(filter_rules(config)),
        "num_shards": shard_count,
        "soco_version": soco.__version__,
    }


def _check_same_run(saved: dict, current: dict, where: Path) -> None:
    """Refuse to continue work that belongs to another folder, algorithm or sharding."""
    if saved["listing_digest"] != current["listing_digest"]:
        if saved["images_root"] != current["images_root"]:
            raise ProposalStoreError(
                f"{where} belongs to another image folder ({saved['images_root']}, "
                f"{saved['num_images']} images), not {current['images_root']}: choose another output"
            )
        raise ProposalStoreError(
            f"{where}: the images in {current['images_root']} changed since this store was started "
            f"({saved['num_images']} images then, {current['num_images']} now): choose another output"
        )
    for key, flag in (("algorithm", "--algorithm"), ("algorithm_params", None), ("filter", None)):
        if saved[key] != current[key]:
            hint = f" (pass {flag} {saved[key]} to continue it)" if flag else ""
            raise ProposalStoreError(
                f"{where} was started with {key}={saved[key]}, this run has {current[key]}{hint}"
            )
    if saved["num_shards"] != current["num_shards"]:
        raise ProposalStoreError(
            f"{where} was started with {saved['num_shards']} shards, this run has {current['num_shards']}"
        )


# Worker state, set once per process by _init_worker (so algorithms are built once, not per image).
_WORKER: dict = {}


def _init_worker(images_root: str, algorithm_name: str, rules: FilterRules) -> None:
    """Per-process set-up: single-threaded OpenCV (parallelism comes from processes)."""
    import cv2

    cv2.setNumThreads(1)
    _WORKER.update(root=Path(images_root), algorithm=get_algorithm(algorithm_name), rules=rules)


def process_image(relative_path: str) -> ImageRecord:
    """Read one image, run selective search and the filter; failures become records, never raise."""
    path = _WORKER["root"] / relative_path
    fingerprint, byte_size = 0, 0
    try:
        data = path.read_bytes()
        fingerprint, byte_size = file_fingerprint(data), len(data)
        rgb = decode_rgb(data, str(path))
    except (ImageReadError, OSError) as error:
        reason = error.reason if isinstance(error, ImageReadError) else f"cannot read file ({error})"
        return ImageRecord(relative_path, fingerprint, byte_size, 0, 0, FAILED_LEVEL, 0, np.zeros((0, 4)), reason)
    height, width = rgb.shape[:2]
    try:
        raw = _WORKER["algorithm"](rgb)
    except Exception as error:  # noqa: BLE001 - one bad image must not stop a million-image run
        return ImageRecord(
            relative_path, fingerprint, byte_size, width, height, FAILED_LEVEL, 0, np.zeros((0, 4)),
            f"proposal algorithm failed: {type(error).__name__}: {error}",
        )
    kept, level = filter_proposals(raw, width, height, _WORKER["rules"])
    return ImageRecord(relative_path, fingerprint, byte_size, width, height, int(level), len(raw), kept)


def resolve_workers(requested: int) -> int:
    """Worker processes to use: `requested`, or one per available core when 0."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _prepare_output(store_dir: Path, identity: dict) -> None:
    """Create or check STORE/parts/run.json; refuse folders that are not ours."""
    if store_dir.exists() and not store_dir.is_dir():
        raise ProposalStoreError(f"output {store_dir} exists and is not a folder")
    parts = store_dir / PARTS_DIR
    run_file = parts / RUN_FILE
    if store_dir.is_dir() and any(store_dir.iterdir()) and not run_file.exists() and not is_store(store_dir):
        raise ProposalStoreError(f"output {store_dir} exists, is not empty and is not a proposal store")
    if run_file.exists():
        _check_same_run(json.loads(run_file.read_text()), identity, store_dir)
        return
    atomic_write_text(run_file, json.dumps(identity, indent=2, sort_keys=True))


def _latest_records(records: list[ImageRecord]) -> dict[str, ImageRecord]:
    """The last record of each path (a recomputed image supersedes its earlier record)."""
    return {record.path: record for record in records}


def _summarise(records: list[ImageRecord], summary: ProposalSummary) -> ProposalSummary:
    """Fill a summary's counts from records."""
    summary.images = len(records)
    summary.failures = sum(r.level == FAILED_LEVEL for r in records)
    summary.proposals = sum(len(r.boxes) for r in records if r.level != FAILED_LEVEL)
    summary.fallbacks = {
        name: count for level, name in FALLBACK_NAMES.items() if (count := sum(r.level == level for r in records))
    }
    summary.failed_images = {r.path: r.reason for r in records if r.level == FAILED_LEVEL}
    return summary


def _summarise_store(store: ProposalStore, summary: ProposalSummary) -> ProposalSummary:
    """Fill a summary's counts from a finished store's arrays (fast at any size)."""
    levels = np.asarray(store.levels)
    summary.images = len(store)
    summary.failures = int((levels == FAILED_LEVEL).sum())
    summary.proposals = int(store.meta["num_boxes"])
    summary.fallbacks = {
        name: count for level, name in FALLBACK_NAMES.items() if (count := int((levels == level).sum()))
    }
    summary.failed_images = store.failures()
    summary.finished = True
    summary.bytes_per_image = store.disk_bytes() / max(1, len(store))
    return summary


def finish_store(store_dir: Path, log_folders: list[Path], identity: dict, keep_parts: bool) -> Path:
    """Merge complete shard logs into a finished store at `store_dir`."""
    paths_expected = identity["num_images"]
    records: dict[str, ImageRecord] = {}
    for folder in log_folders:
        for log_path in sorted((folder / PARTS_DIR).glob("shard-*.log")):
            records.update(_latest_records(read_log(log_path)[0]))
    ordered = sorted(records.values(), key=lambda r: r.path)
    if len(ordered) != paths_expected or listing_digest([r.path for r in ordered]) != identity["listing_digest"]:
        raise ProposalStoreError(
            f"cannot finish {store_dir}: the shard logs hold {len(ordered)} of {paths_expected} images; "
            "run the missing shards first"
        )
    meta = {key: identity[key] for key in ("images_root", "algorithm", "algorithm_params", "filter", "soco_version")}
    write_store(store_dir, ordered, meta)
    if not keep_parts:
        shutil.rmtree(store_dir / PARTS_DIR, ignore_errors=True)
    return store_dir


def _shard_complete(store_dir: Path, shard: Shard, paths: list[str]) -> bool:
    """Whether one shard's log covers all of its images."""
    done = {r.path for r in read_log(store_dir / PARTS_DIR / shard.log_name())[0]}
    return set(shard.select(paths)) <= done


def run_proposals(
    images_root: str | Path,
    store_dir: str | Path,
    config: ProposalsConfig,
    shard: Shard = Shard(),
    progress: bool = True,
) -> ProposalSummary:
    """Compute (or continue computing) proposals for every image of a folder into a store."""
    started = time.perf_counter()
    images_root = Path(images_root).expanduser().resolve()
    store_dir = Path(store_dir).expanduser()
    paths = list_images(images_root)
    identity = run_identity(images_root, paths, config, shard.count)
    summary = ProposalSummary(store=str(store_dir))

    if is_store(store_dir):
        store = ProposalStore(store_dir)
        _check_same_run({**identity, **store.meta, "num_shards": shard.count}, identity, store_dir)
        summary = _summarise_store(store, summary)
        summary.seconds = time.perf_counter() - started
        return summary

    _prepare_output(store_dir, identity)
    shard_paths = shard.select(paths)
    log = WorkLog(store_dir / PARTS_DIR / shard.log_name())
    with log:
        # A record is valid only if the file still has the size it had when it was computed.
        done = {
            r.path
            for r in _latest_records(log.records).values()
            if (images_root / r.path).exists() and (images_root / r.path).stat().st_size == r.byte_size
        }
        todo = [p for p in shard_paths if p not in done]
        workers = min(resolve_workers(config.workers), max(1, len(todo)))
        init_args = (str(images_root), config.algorithm, filter_rules(config))
        bar = tqdm(
            total=len(shard_paths), initial=len(shard_paths) - len(todo), unit="img",
            desc=f"proposals ({identity['algorithm']}, {workers} workers)", disable=not progress,
            dynamic_ncols=True,
        )
        last_sync = time.monotonic()
        pool = None
        try:
            if workers == 1:
                _init_worker(*init_args)
                results = map(process_image, todo)
            else:
                pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args)
                results = pool.imap_unordered(process_image, todo, chunksize=1)
            for record in results:
                log.append(record)
                bar.update(1)
                summary.computed_now += 1
                if time.monotonic() - last_sync > SYNC_EVERY_SECONDS:
                    log.sync()
                    last_sync = time.monotonic()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()

    elapsed = time.perf_counter() - started
    summary.seconds = elapsed
    summary.images_per_second = summary.computed_now / elapsed if elapsed > 0 else 0.0
    all_shards = [Shard(i, shard.count) for i in range(shard.count)]
    if all(_shard_complete(store_dir, s, paths) for s in all_shards):
        finish_store(store_dir, [store_dir], identity, keep_parts=False)
        _summarise_store(ProposalStore(store_dir), summary)
    else:
        shard_records = list(_latest_records(read_log(store_dir / PARTS_DIR / shard.log_name())[0]).values())
        _summarise(shard_records, summary)
    (store_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def merge_stores(sources: list[str | Path], store_dir: str | Path) -> Path:
    """Merge the shard logs of several output folders (one per machine) into one finished store."""
    sources = [Path(s) for s in sources]
    identities = []
    for source in sources:
        run_file = source / PARTS_DIR / RUN_FILE
        if not run_file.is_file():
            raise ProposalStoreError(f"{source} holds no shard work ({run_file} missing)")
        identities.append(json.loads(run_file.read_text()))
    identity = identities[0]
    for source, other in zip(sources[1:], identities[1:]):
        _check_same_run(identity, {**other, "images_root": identity["images_root"]}, source)
    store_dir = Path(store_dir)
    if is_store(store_dir):
        raise ProposalStoreError(f"{store_dir} is already a finished store")
    store_dir.mkdir(parents=True, exist_ok=True)
    return finish_store(store_dir, sources, identity, keep_parts=True)
