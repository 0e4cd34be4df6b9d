"""`soco proposals`: selective search over an image folder, parallel, sharded, resumable, updatable.

Work goes to STORE/parts/: `run.json` (what the run is: image folder, its listing, algorithm, filter,
shard count) and one append-only log per shard. A killed run reopens its log and computes only the
images without an up-to-date record. When every image has one, the records are written as a finished
store in STORE/parts/staged/ and moved into STORE (meta.json last), so a kill while finishing loses
nothing either.

Running into a finished store brings it up to date with the folder: images whose size or content
fingerprint changed and new images are computed, removed images dropped, recorded failures retried;
the other images keep their boxes. Only one run works on an output (or on one shard of it) at a time:
each holds a `flock` on a lock file in the output folder.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import soco
from soco.config.schema import ProposalsConfig
from soco.data.image_files import decode_rgb, file_fingerprint
from soco.data.proposals.filter import FilterRules, filter_proposals
from soco.data.proposals.selective_search import ALGORITHM_NAMES, RENAMED_ALGORITHMS, get_algorithm
from soco.data.proposals.store import FAILED_LEVEL, STORE_FILES, ImageRecord, ProposalStore, image_listing
from soco.data.proposals.store import is_folder_entry, is_store, listing_digest, no_space_error, write_store
from soco.data.proposals.worklog import WorkLog, read_log
from soco.errors import DataError, ImageReadError, ProposalStoreError
from soco.files import LOCK_NAME, atomic_write_text, folder_lock

PARTS_DIR = "parts"
RUN_FILE = "run.json"
STAGED_DIR = "staged"
LOCK_PREFIX = LOCK_NAME  # one lock per shard and one to finish: .lock-shard-..., .lock-finish
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

    def lock_name(self) -> str:
        """File name of the lock that keeps two runs off this shard of an output."""
        return LOCK_PREFIX if self.count == 1 else f"{LOCK_PREFIX}-shard-{self.index:05d}-of-{self.count:05d}"


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
    update: dict | None = None  # changed, added, removed, retried: the folder against the finished store

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        readable = max(0, self.images - self.failures)
        mean = self.proposals / max(1, readable)
        fallback_text = ", ".join(f"{k}: {v}" for k, v in self.fallbacks.items()) or "none"
        out = [f"images: {self.images} ({self.computed_now} computed now, {self.failures} failed)"]
        if self.update is not None:
            out.append(update_line(self.update))
        out += [
            f"proposals kept: {self.proposals} in total; per readable image: mean {mean:.1f}",
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


def update_line(counts: dict) -> str:
    """The one line saying how a run changed an existing store."""
    if not any(counts.values()):
        return "update: the store was up to date (no image changed, added or removed; no failure to retry)"
    return (
        f"update: {counts['changed']} changed, {counts['added']} added, {counts['removed']} removed, "
        f"{counts['retried']} failures retried"
    )


def filter_rules(config: ProposalsConfig) -> FilterRules:
    """The filter thresholds of a proposals configuration."""
    return FilterRules(
        min_side=config.min_side,
        max_aspect=config.max_aspect,
        min_relative_scale=config.min_relative_scale,
        max_relative_scale=config.max_relative_scale,
    )


def run_identity(images_root: Path, paths: list[str], config: ProposalsConfig, shard_count: int) -> dict:
    """What a run is; a resumed or merged run must agree on all of it (an update: all but the listing)."""
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


def refuse_other_algorithm(store_dir: Path, config: ProposalsConfig) -> None:
    """ProposalStoreError in one line when a store was made by another algorithm, or other parameters, than the
    configuration names (a store of an earlier default, say), with the two ways on."""
    meta = ProposalStore(store_dir).meta
    wanted = get_algorithm(config.algorithm)
    made = (meta.get("algorithm"), meta.get("algorithm_params"))
    if made == (wanted.name, wanted.params):
        return
    ways = f"recompute it (`soco proposals IMAGES -o NEW_STORE` with proposals.algorithm={wanted.name}) and pass the new store"
    name = RENAMED_ALGORITHMS.get(made[0], made[0])
    if name in ALGORITHM_NAMES and get_algorithm(name).params == made[1]:
        ways += f", or train on this one with proposals.algorithm={name}"
    raise ProposalStoreError(f"{store_dir} was made by the proposal algorithm {made[0]!r} with {made[1]}, this "
                             f"configuration uses {wanted.name!r} with {wanted.params}: {ways}")


def _check_same_run(saved: dict, current: dict, where: Path, allow_new_listing: bool = False) -> None:
    """Refuse to continue work that belongs to another folder, algorithm or sharding.

    With `allow_new_listing`, images added to or removed from the same folder are accepted: the run
    updates the work instead.
    """
    if saved["listing_digest"] != current["listing_digest"]:
        if saved["images_root"] != current["images_root"]:
            raise ProposalStoreError(
                f"{where} belongs to another image folder ({saved['images_root']}, "
                f"{saved['num_images']} images), not {current['images_root']}: choose another output"
            )
        if not allow_new_listing:
            raise ProposalStoreError(
                f"{where}: the images in {current['images_root']} changed since this store was started "
                f"({saved['num_images']} images then, {current['num_images']} now): run the shards again"
            )
    for key, flag in (("algorithm", "--algorithm"), ("algorithm_params", None), ("filter", None)):
        if saved[key] != current[key]:
            # a store of an earlier soco may name an algorithm that has been renamed since
            hint = f" (pass {flag} {RENAMED_ALGORITHMS.get(saved[key], saved[key])} to continue it)" if flag else ""
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
        if not byte_size:  # the size of an unreadable file still tells a later run whether it changed
            try:
                byte_size = path.stat().st_size
            except OSError:
                pass
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


def output_lock(store_dir: Path, name: str = LOCK_PREFIX, wait: bool = False):
    """Hold the folder lock STORE/name for a block (`files.folder_lock`); refuse, naming the holder, when it is held.

    With `wait`, block until the holder lets go instead (finishing a store, which takes seconds).
    """
    return folder_lock(store_dir, "soco proposals", name, wait=wait, error=ProposalStoreError)


@contextmanager
def _disk_full_is_one_line(store_dir: Path) -> Iterator[None]:
    """Turn a full disk anywhere in a run into one line; every write before it is kept."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise no_space_error(error.filename or store_dir) from None
        raise


def _check_output(store_dir: Path) -> None:
    """Refuse an output that is a file, or a folder of other things than a store or its work."""
    if store_dir.exists() and not store_dir.is_dir():
        raise ProposalStoreError(f"output {store_dir} exists and is not a folder")
    if not store_dir.is_dir() or is_store(store_dir) or (store_dir / PARTS_DIR / RUN_FILE).exists():
        return
    if (store_dir / PARTS_DIR / STAGED_DIR / "meta.json").exists():
        return
    if any(not entry.name.startswith(LOCK_PREFIX) for entry in store_dir.iterdir()):
        raise ProposalStoreError(f"output {store_dir} exists, is not empty and is not a proposal store")


def _latest_records(records: list[ImageRecord]) -> dict[str, ImageRecord]:
    """The last record of each path (a recomputed image supersedes its earlier record)."""
    return {record.path: record for record in records}


@dataclass
class WorkPlan:
    """Where every image of the folder stands: up to date (and from where) or still to compute."""

    valid: dict = field(default_factory=dict)  # path -> ImageRecord from a log, or index in the finished store
    todo: set = field(default_factory=set)  # paths some shard must still compute
    log_lengths: dict = field(default_factory=dict)  # log file -> records it held when planned
    counts: dict | None = None  # changed, added, removed, retried against the finished store

    def up_to_date(self, base: ProposalStore | None) -> bool:
        """Whether the finished store already is the result (nothing to compute, drop or merge in)."""
        return (
            base is not None
            and not self.todo
            and not self.counts["removed"]
            and all(not isinstance(source, ImageRecord) for source in self.valid.values())
        )


def _size(file: Path) -> int | None:
    """A file's size in bytes, None when it cannot be read."""
    try:
        return file.stat().st_size
    except OSError:
        return None


def plan_work(
    images_root: Path, entries: list[str], base: ProposalStore | None, logs: dict[Path, list[ImageRecord]],
    progress: bool = False,
) -> WorkPlan:
    """Decide which images have an up-to-date record (same size and content fingerprint) and which not.

    A record in a work log wins over the finished store's (it is newer); a failure in a log counts as
    up to date while the file keeps its size (it was just tried), a failure in the finished store is
    tried again. Files are read (to fingerprint them) only where a record could be kept.
    """
    latest: dict[str, ImageRecord] = {}
    plan = WorkPlan(counts={"changed": 0, "added": 0, "removed": 0, "retried": 0} if base is not None else None)
    for log_path, records in logs.items():
        latest.update(_latest_records(records))
        plan.log_lengths[log_path] = len(records)
    fingerprints: dict[str, int | None] = {}

    def fingerprint(path: str) -> int | None:
        if path not in fingerprints:
            try:
                fingerprints[path] = file_fingerprint((images_root / path).read_bytes())
            except OSError:
                fingerprints[path] = None
        return fingerprints[path]

    found_in_base = 0
    checking = base is not None or bool(latest)
    for path in tqdm(entries, desc="checking images against earlier work", unit="img", dynamic_ncols=True,
                     disable=not (progress and checking)):
        index = _index_in(base, path)
        found_in_base += index is not None
        record = latest.get(path)
        base_failed = index is not None and int(base.levels[index]) == FAILED_LEVEL
        if is_folder_entry(path):  # an unreadable folder: listed again just now, nothing to compare
            log_ok, base_ok = record is not None, False
        else:
            size = _size(images_root / path) if (record is not None or index is not None) else None
            log_ok = (
                record is not None and size == record.byte_size
                and (record.level == FAILED_LEVEL or fingerprint(path) == record.fingerprint)
            )
            base_ok = (
                index is not None and not base_failed and size == int(base.byte_sizes[index])
                and fingerprint(path) == int(base.fingerprints[index])
            )
        if log_ok:
            plan.valid[path] = record
        elif base_ok:
            plan.valid[path] = index
        else:
            plan.todo.add(path)
        if base is not None:
            kind = "added" if index is None else "retried" if base_failed else None if base_ok else "changed"
            if kind:
                plan.counts[kind] += 1
    if base is not None:
        plan.counts["removed"] = len(base) - found_in_base
    return plan


def _index_in(store: ProposalStore | None, path: str) -> int | None:
    """Index of a path in a store, None when absent (or no store)."""
    if store is None:
        return None
    try:
        return store.index_of(path)
    except KeyError:
        return None


def _read_logs(store_dir: Path, shard_count: int) -> dict[Path, list[ImageRecord]]:
    """The intact records of every shard log of an output (this sharding's only)."""
    folder = store_dir / PARTS_DIR
    return {path: read_log(path)[0] for path in sorted(folder.glob(f"shard-*-of-{shard_count:05d}.log"))}


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


def _store_meta(identity: dict) -> dict:
    """What meta.json keeps of a run's identity."""
    return {key: identity[key] for key in ("images_root", "algorithm", "algorithm_params", "filter", "soco_version")}


def _commit_staged(store_dir: Path) -> bool:
    """Move a finished store staged in STORE/parts/staged into STORE, meta.json last; then drop the work.

    Every step can be repeated, so a kill while moving is finished by the next run.
    """
    staged = store_dir / PARTS_DIR / STAGED_DIR
    if not (staged / "meta.json").is_file():
        return False
    (store_dir / "meta.json").unlink(missing_ok=True)
    for name in STORE_FILES:
        if (staged / name).exists():
            os.replace(staged / name, store_dir / name)
    os.replace(staged / "meta.json", store_dir / "meta.json")
    shutil.rmtree(store_dir / PARTS_DIR, ignore_errors=True)
    return True


def _finish(store_dir: Path, entries: list[str], plan: WorkPlan, base: ProposalStore | None, identity: dict) -> None:
    """Write every image's up-to-date record as the finished store."""
    records = [
        source if isinstance(source, ImageRecord) else base.record(source)
        for source in (plan.valid[path] for path in entries)
    ]
    write_store(store_dir / PARTS_DIR / STAGED_DIR, records, _store_meta(identity))
    _commit_staged(store_dir)


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
    write_store(store_dir, ordered, _store_meta(identity))
    if not keep_parts:
        shutil.rmtree(store_dir / PARTS_DIR, ignore_errors=True)
    return store_dir


def _compute(
    paths: list[str], log: WorkLog, images_root: Path, config: ProposalsConfig, unreadable: dict[str, str],
    bar: tqdm,
) -> dict[str, ImageRecord]:
    """Compute the records of `paths` (unreadable folders recorded as they are), appending each to the log."""
    computed: dict[str, ImageRecord] = {}

    def keep(record: ImageRecord) -> None:
        try:
            log.append(record)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise no_space_error(log.path) from None
            raise
        computed[record.path] = record
        bar.update(1)

    images = []
    for path in paths:
        if is_folder_entry(path):
            keep(ImageRecord(path, 0, 0, 0, 0, FAILED_LEVEL, 0, np.zeros((0, 4), np.float32), unreadable[path]))
        else:
            images.append(path)
    workers = min(resolve_workers(config.workers), max(1, len(images)))
    bar.set_description(f"proposals ({get_algorithm(config.algorithm).name}, {workers} workers)")
    init_args = (str(images_root), config.algorithm, filter_rules(config))
    last_sync = time.monotonic()
    pool = None
    try:
        if workers == 1:
            _init_worker(*init_args)
            results = map(process_image, images)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args)
            results = pool.imap_unordered(process_image, images, chunksize=1)
        for record in results:
            keep(record)
            if time.monotonic() - last_sync > SYNC_EVERY_SECONDS:
                log.sync()
                last_sync = time.monotonic()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return computed


def _collect_other_shards(store_dir: Path, plan: WorkPlan, shard_count: int, images_root: Path) -> bool:
    """Take in what other shards computed since planning; True when no image is left to compute."""
    if not plan.todo:
        return True
    for log_path, records in _read_logs(store_dir, shard_count).items():
        for record in records[plan.log_lengths.get(log_path, 0) :]:
            if record.path in plan.todo and (
                is_folder_entry(record.path) or _size(images_root / record.path) == record.byte_size
            ):
                plan.valid[record.path] = record
                plan.todo.discard(record.path)
    return not plan.todo


def run_proposals(
    images_root: str | Path,
    store_dir: str | Path,
    config: ProposalsConfig,
    shard: Shard = Shard(),
    progress: bool = True,
) -> ProposalSummary:
    """Compute, continue or update proposals for every image of a folder into a store."""
    started = time.perf_counter()
    images_root = Path(images_root).expanduser().resolve()
    store_dir = Path(store_dir).expanduser()
    entries, unreadable = image_listing(images_root)
    identity = run_identity(images_root, entries, config, shard.count)
    _check_output(store_dir)
    with _disk_full_is_one_line(store_dir), output_lock(store_dir, shard.lock_name()):
        summary = _run_locked(images_root, store_dir, entries, unreadable, identity, config, shard, progress)
    summary.seconds = time.perf_counter() - started
    summary.images_per_second = summary.computed_now / summary.seconds if summary.seconds > 0 else 0.0
    return summary


def _run_locked(
    images_root: Path, store_dir: Path, entries: list[str], unreadable: dict[str, str], identity: dict,
    config: ProposalsConfig, shard: Shard, progress: bool,
) -> ProposalSummary:
    """The body of a run, with this shard of the output locked."""
    summary = ProposalSummary(store=str(store_dir))
    run_file = store_dir / PARTS_DIR / RUN_FILE
    with output_lock(store_dir, f"{LOCK_PREFIX}-finish", wait=True):
        _commit_staged(store_dir)  # a finish killed half-way through moving files in
    base = None
    if is_store(store_dir):
        base = ProposalStore(store_dir)
        _check_same_run({**identity, **base.meta, "num_shards": shard.count}, identity, store_dir, True)
    if run_file.exists():
        _check_same_run(json.loads(run_file.read_text()), identity, store_dir, allow_new_listing=True)
    plan = plan_work(images_root, entries, base, _read_logs(store_dir, shard.count), progress)
    summary.update = plan.counts
    if plan.up_to_date(base):
        return _summarise_store(base, summary)

    if not run_file.exists() or json.loads(run_file.read_text()) != identity:
        atomic_write_text(run_file, json.dumps(identity, indent=2, sort_keys=True))
    share = shard.select(entries)
    mine = [path for path in share if path in plan.todo]
    with WorkLog(store_dir / PARTS_DIR / shard.log_name()) as log, tqdm(
        total=len(share), initial=len(share) - len(mine), unit="img", disable=not progress, dynamic_ncols=True,
    ) as bar:
        computed = _compute(mine, log, images_root, config, unreadable, bar)
    summary.computed_now = len(computed)
    plan.valid.update(computed)
    plan.todo.difference_update(computed)

    if _collect_other_shards(store_dir, plan, shard.count, images_root):
        with output_lock(store_dir, f"{LOCK_PREFIX}-finish", wait=True):
            if run_file.exists():  # else another shard finished the store meanwhile
                _finish(store_dir, entries, plan, base, identity)
        _summarise_store(ProposalStore(store_dir), summary)
    else:
        sources = (plan.valid[path] for path in share if path in plan.valid)
        _summarise([s if isinstance(s, ImageRecord) else base.record(s) for s in sources], summary)
    atomic_write_text(store_dir / "summary.json", json.dumps(asdict(summary), indent=2))
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
    with _disk_full_is_one_line(store_dir), output_lock(store_dir):
        return finish_store(store_dir, sources, identity, keep_parts=True)
