"""Open time, lookup time, memory and bytes per image of a proposal store with many synthetic entries.

    python benchmarks/store_open.py [--images 1000000] [--boxes-per-image 30] [--folder DIR]

Writes the synthetic store once (kept in --folder for later runs), then opens it in a fresh process
and prints JSON: open seconds, resident memory added by opening, O(1) lookups per second, bytes per image.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from soco.data.proposals.store import ImageRecord, ProposalStore, is_store, write_store

MEASURE = r"""
import json, resource, sys, time
import numpy as np
from soco.data.proposals.store import ProposalStore
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
store = ProposalStore(sys.argv[1])
open_seconds = time.perf_counter() - start
rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = np.random.default_rng(0)
indices = rng.integers(0, len(store), 2000)
paths = [f"n{int(i) % 1000:08d}/img_{int(i):08d}.JPEG" for i in indices]
start = time.perf_counter()
for path in paths:
    store.boxes(store.index_of(path))
lookup_seconds = (time.perf_counter() - start) / len(paths)
print(json.dumps({
    "images": len(store),
    "open_seconds": open_seconds,
    "open_rss_added_mib": (rss_after - rss_before) / 1024,
    "lookup_by_path_and_boxes_us": lookup_seconds * 1e6,
    "bytes_per_image": store.disk_bytes() / len(store),
    "bytes_on_disk": store.disk_bytes(),
}))
"""


def build(folder: Path, images: int, boxes_per_image: int) -> None:
    """Write a store of `images` synthetic ImageNet-like entries."""
    rng = np.random.default_rng(0)
    counts = rng.integers(max(1, boxes_per_image // 2), boxes_per_image * 3 // 2 + 1, images)
    all_boxes = rng.uniform(0, 500, size=(int(counts.sum()), 4)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    records = [
        ImageRecord(
            f"n{i % 1000:08d}/img_{i:08d}.JPEG", int(rng.integers(0, 2**63)), 110_000, 500, 375, 0, 800,
            all_boxes[offsets[i] : offsets[i + 1]],
        )
        for i in range(images)
    ]
    write_store(folder, records, {"algorithm": "synthetic", "algorithm_params": {}})


def main() -> None:
    """Build if needed, then measure in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--boxes-per-image", type=int, default=30)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    folder = Path(args.folder or Path(tempfile.gettempdir()) / f"soco-store-{args.images}-{args.boxes_per_image}")
    if not is_store(folder) or ProposalStore(folder).meta["num_images"] != args.images:
        start = time.perf_counter()
        build(folder, args.images, args.boxes_per_image)
        print(f"built {folder} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, check=True)
    print(result.stdout.strip())


if __name__ == "__main__":
    main()
