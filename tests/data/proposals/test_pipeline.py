"""The proposal run: results, bad images, resume after SIGKILL, shards and merge, clear errors."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from soco.config.schema import ProposalsConfig
from soco.data.proposals.pipeline import PARTS_DIR, Shard, merge_stores, run_proposals
from soco.data.proposals.store import FAILED_LEVEL, ProposalStore
from soco.data.proposals.worklog import read_log
from soco.errors import DataError, ProposalStoreError

from .conftest import make_image_folder

ARRAYS = ("path_bytes", "path_offsets", "path_table", "sizes", "fingerprints", "byte_sizes", "levels",
          "raw_counts", "box_offsets", "boxes")


def assert_same_store(folder_a, folder_b):
    """Two stores hold identical arrays and identical metadata."""
    a, b = ProposalStore(folder_a), ProposalStore(folder_b)
    for name in ARRAYS:
        np.testing.assert_array_equal(np.asarray(getattr(a, f"_{name}")), np.asarray(getattr(b, f"_{name}")), err_msg=name)
    assert a.meta == b.meta
    assert a.failures() == b.failures()


def config(**changes):
    return ProposalsConfig(**{"workers": 1, **changes})


def test_run_produces_filtered_boxes_inside_each_image(image_folder, tmp_path):
    summary = run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    store = ProposalStore(tmp_path / "store")
    assert summary.finished and summary.images == 8 and summary.failures == 0
    assert len(store) == 8 and store.paths()[0] == "group0/scene_000.jpg"
    for index in range(len(store)):
        width, height = store.sizes[index]
        assert (width, height) == (160, 120)
        boxes = store.boxes(index)
        assert len(boxes) >= 1
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
        if store.levels[index] == 0:  # the full filter held: every box obeys all three rules
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            assert (w >= 32).all() and (h >= 32).all()
            assert ((w / h <= 3) & (h / w <= 3)).all()
            scale = np.sqrt(w * h) / np.sqrt(width * height)
            assert ((scale >= 0.3) & (scale <= 0.8)).all()
    assert summary.proposals == store.meta["num_boxes"] == int(store.box_counts.sum())
    assert not (tmp_path / "store" / PARTS_DIR).exists()  # work files removed once finished


def test_corrupt_images_are_recorded_and_the_run_goes_on(image_folder, tmp_path):
    (image_folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = (image_folder / "group0" / "scene_000.jpg").read_bytes()
    (image_folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    summary = run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    store = ProposalStore(tmp_path / "store")
    assert summary.images == 10 and summary.failures == 2
    failures = store.failures()
    assert set(failures) == {"broken.jpg", "truncated.jpg"}
    assert all(reason for reason in failures.values())
    assert store.levels[store.index_of("broken.jpg")] == FAILED_LEVEL
    assert len(store.valid_indices()) == 8
    assert any("broken.jpg" in line for line in summary.lines())


def test_second_run_of_a_finished_store_computes_nothing(image_folder, tmp_path):
    run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    again = run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    assert again.finished and again.computed_now == 0 and again.images == 8


KILL_SCRIPT = """
import sys
from soco.config.schema import ProposalsConfig
from soco.data.proposals.pipeline import run_proposals
run_proposals(sys.argv[1], sys.argv[2], ProposalsConfig(workers=1, algorithm="repaired"), progress=False)
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    images = make_image_folder(tmp_path / "images", 16, size=(200, 150))
    run_proposals(images, tmp_path / "whole", config(algorithm="repaired"), progress=False)

    log_path = tmp_path / "killed" / PARTS_DIR / Shard().log_name()
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(images), str(tmp_path / "killed")])
    deadline = time.monotonic() + 120
    while len(read_log(log_path)[0]) < 4:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before, _ = read_log(log_path)
    assert 4 <= len(done_before) < 16, "kill must land in the middle of the run"
    assert not (tmp_path / "killed" / "meta.json").exists()

    resumed = run_proposals(images, tmp_path / "killed", config(algorithm="repaired"), progress=False)
    assert resumed.computed_now == 16 - len({r.path for r in done_before})  # nothing computed twice
    assert_same_store(tmp_path / "whole", tmp_path / "killed")


def test_shards_in_one_folder_merge_automatically(image_folder, tmp_path):
    run_proposals(image_folder, tmp_path / "whole", config(), progress=False)
    for index in range(3):
        summary = run_proposals(image_folder, tmp_path / "sharded", config(), Shard(index, 3), progress=False)
        assert summary.finished == (index == 2)
    assert_same_store(tmp_path / "whole", tmp_path / "sharded")


@pytest.mark.slow
def test_shards_from_separate_machines_merge_with_the_merge_command(image_folder, tmp_path):
    run_proposals(image_folder, tmp_path / "whole", config(workers=2), progress=False)
    sources = []
    for index in range(2):
        sources.append(tmp_path / f"machine{index}")
        run_proposals(image_folder, sources[-1], config(), Shard(index, 2), progress=False)
    with pytest.raises(ProposalStoreError, match="hold 4 of 8 images"):
        merge_stores(sources[:1], tmp_path / "partial")
    merge_stores(sources, tmp_path / "merged")
    assert_same_store(tmp_path / "whole", tmp_path / "merged")


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        run_proposals(tmp_path / "nowhere", tmp_path / "store", config(), progress=False)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty"):
        run_proposals(tmp_path / "empty", tmp_path / "store", config(), progress=False)


def test_output_of_another_folder_is_refused(image_folder, tmp_path):
    other = make_image_folder(tmp_path / "other", 3)
    run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    with pytest.raises(ProposalStoreError, match="belongs to another image folder"):
        run_proposals(other, tmp_path / "store", config(), progress=False)
    # The same while unfinished: a shard's work folder remembers its images too.
    run_proposals(image_folder, tmp_path / "half", config(), Shard(0, 2), progress=False)
    with pytest.raises(ProposalStoreError, match="belongs to another image folder"):
        run_proposals(other, tmp_path / "half", config(), Shard(1, 2), progress=False)
    with pytest.raises(ProposalStoreError, match="started with algorithm=release"):
        run_proposals(image_folder, tmp_path / "half", config(algorithm="repaired"), Shard(1, 2), progress=False)


def test_non_store_output_folder_is_not_touched(image_folder, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ProposalStoreError, match="not a proposal store"):
        run_proposals(image_folder, tmp_path / "mine", config(), progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_store_refuses_changed_or_other_images(image_folder, tmp_path):
    run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    store = ProposalStore(tmp_path / "store")
    store.check_images(image_folder, fingerprint_sample=None)  # the same images pass
    with pytest.raises(ProposalStoreError, match="another image folder"):
        store.check_images(make_image_folder(tmp_path / "other", 3))
    target = image_folder / "group1" / "scene_001.png"
    data = bytearray(target.read_bytes())
    data[-20] ^= 0x01  # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(ProposalStoreError, match="scene_001.png changed.*fingerprint"):
        store.check_images(image_folder, fingerprint_sample=None)


@pytest.mark.parametrize("text", ["3/3", "1", "a/b", "-1/2"])
def test_bad_shard_specs(text):
    with pytest.raises(DataError, match="shard"):
        Shard.parse(text)
