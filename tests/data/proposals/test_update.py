"""Bringing a store up to date with its folder, and runs that meet a full disk, an unreadable folder
or another run on the same output."""

import builtins
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from soco.data.proposals import worklog
from soco.data.proposals.pipeline import PARTS_DIR, Shard, output_lock, run_proposals
from soco.data.proposals.store import ProposalStore, is_store, left_out_message
from soco.data.proposals.worklog import encode_record, read_log
from soco.errors import ProposalStoreError

from .conftest import make_image_folder, synthetic_scene
from .test_pipeline import assert_same_store, config


def test_rerun_recomputes_changed_and_added_drops_removed_and_retries_failures(tmp_path):
    images = make_image_folder(tmp_path / "images", 8)
    synthetic_scene(100).save(images / "flat.bmp")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (images / "still_broken.jpg").write_bytes(b"not a jpeg either")
    store = tmp_path / "store"
    first = run_proposals(images, store, config(), progress=False)
    assert (first.images, first.failures, first.update) == (11, 2, None)

    synthetic_scene(200).save(images / "group1" / "scene_001.png")  # another picture under the same name
    bmp_size = (images / "flat.bmp").stat().st_size
    synthetic_scene(101).save(images / "flat.bmp")  # same byte size, other content: only the fingerprint tells
    assert (images / "flat.bmp").stat().st_size == bmp_size
    synthetic_scene(5).save(images / "broken.jpg", format="JPEG")  # repaired
    (images / "group2" / "scene_005.png").unlink()
    synthetic_scene(300).save(images / "group2" / "new_a.jpg")
    synthetic_scene(301).save(images / "new_b.png")

    with pytest.raises(ProposalStoreError, match=(
        rf"2 images added, e\.g\. \['group2/new_a.jpg', 'new_b.png'\]; 1 removed, e\.g\. \['group2/scene_005.png'\]\): "
        rf"run `soco proposals {images} -o {store}` to update the store"
    )):
        ProposalStore(store).check_images(images)  # what training says first
    second = run_proposals(images, store, config(), progress=False)
    assert second.update == {"changed": 2, "added": 2, "removed": 1, "retried": 2}
    assert second.computed_now == 6  # 2 changed + 2 added + 2 retried; the other 6 keep their records
    assert "update: 2 changed, 2 added, 1 removed, 2 failures retried" in second.lines()
    assert second.finished and (second.images, second.failures) == (12, 1)
    updated = ProposalStore(store)
    assert "group2/scene_005.png" not in updated and updated.failures() == {"still_broken.jpg": updated.failures()["still_broken.jpg"]}
    # The same store as a first run on today's folder makes: the old boxes and failures are gone.
    run_proposals(images, tmp_path / "fresh", config(), progress=False)
    assert_same_store(store, tmp_path / "fresh")

    third = run_proposals(images, store, config(), progress=False)
    assert third.update == {"changed": 0, "added": 0, "removed": 0, "retried": 1} and third.computed_now == 1
    assert_same_store(store, tmp_path / "fresh")


def test_an_unchanged_store_is_left_as_it_is(image_folder, tmp_path):
    run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    written = (tmp_path / "store" / "boxes.npy").stat().st_mtime_ns
    again = run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    assert again.computed_now == 0 and again.update == {"changed": 0, "added": 0, "removed": 0, "retried": 0}
    assert "update: the store was up to date" in again.lines()[1]
    assert (tmp_path / "store" / "boxes.npy").stat().st_mtime_ns == written
    assert not (tmp_path / "store" / PARTS_DIR).exists()


KILL_SCRIPT = """
import sys
from soco.config.schema import ProposalsConfig
from soco.data.proposals.pipeline import run_proposals
run_proposals(sys.argv[1], sys.argv[2], ProposalsConfig(workers=1, algorithm="repaired"), progress=False)
"""


@pytest.mark.slow
def test_killed_update_resumes_to_the_uninterrupted_result(tmp_path):
    images = make_image_folder(tmp_path / "images", 10, size=(200, 150))
    store = tmp_path / "store"
    run_proposals(images, store, config(algorithm="repaired"), progress=False)
    old_boxes = ProposalStore(store).boxes("group0/scene_000.jpg").copy()
    changed = sorted(images.rglob("scene_00[0-5].*"))
    for number, path in enumerate(changed):
        synthetic_scene(500 + number, 200, 150).save(path)

    log_path = store / PARTS_DIR / Shard().log_name()
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(images), str(store)])
    deadline = time.monotonic() + 120
    while len(read_log(log_path)[0]) < 2:
        assert process.poll() is None, "the update ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {r.path for r in read_log(log_path)[0]}
    assert 2 <= len(done_before) < 6, "the kill must land in the middle of the update"
    # Until the update finishes, the old store stays whole and usable.
    np.testing.assert_array_equal(ProposalStore(store).boxes("group0/scene_000.jpg"), old_boxes)

    resumed = run_proposals(images, store, config(algorithm="repaired"), progress=False)
    assert resumed.computed_now == 6 - len(done_before)  # nothing computed twice
    assert resumed.update == {"changed": 6, "added": 0, "removed": 0, "retried": 0}
    run_proposals(images, tmp_path / "fresh", config(algorithm="repaired"), progress=False)
    assert_same_store(store, tmp_path / "fresh")


class Killed(Exception):
    """Stands for a SIGKILL in the middle of a step."""


def test_kill_while_moving_the_finished_store_in_is_repaired_by_the_next_run(image_folder, tmp_path, monkeypatch):
    store = tmp_path / "store"
    run_proposals(image_folder, store, config(), progress=False)
    synthetic_scene(77).save(image_folder / "group0" / "scene_003.jpg")
    real_replace = os.replace

    def replace(source, target):
        if Path(target) == store / "boxes.npy":
            raise Killed
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        run_proposals(image_folder, store, config(), progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not is_store(store)  # half moved: meta.json is gone until the move is complete

    again = run_proposals(image_folder, store, config(), progress=False)
    assert again.computed_now == 0 and again.update == {"changed": 0, "added": 0, "removed": 0, "retried": 0}
    run_proposals(image_folder, tmp_path / "fresh", config(), progress=False)
    assert_same_store(store, tmp_path / "fresh")


def test_full_disk_while_computing_keeps_every_finished_image(image_folder, tmp_path, monkeypatch):
    writes = []

    class FillingDisk:
        """A log file on a disk that fills up during the fourth record."""

        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 4:
                self._handle.write(bytes(data[: len(data) // 2]))  # part of the record reaches the disk
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._handle.write(data)

        def __getattr__(self, name):
            return getattr(self._handle, name)

    monkeypatch.setattr(worklog, "open", lambda *a, **k: FillingDisk(builtins.open(*a, **k)), raising=False)  # noqa: SIM115
    log_path = tmp_path / "store" / PARTS_DIR / Shard().log_name()
    with pytest.raises(ProposalStoreError) as caught:
        run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    assert str(caught.value).startswith(f"no space left on device while writing {log_path}; the work so far is kept")
    monkeypatch.undo()
    kept, length = read_log(log_path)
    assert len(kept) == 3 and log_path.stat().st_size == length == sum(len(encode_record(r)) for r in kept)

    resumed = run_proposals(image_folder, tmp_path / "store", config(), progress=False)
    assert resumed.computed_now == 8 - 3
    run_proposals(image_folder, tmp_path / "fresh", config(), progress=False)
    assert_same_store(tmp_path / "store", tmp_path / "fresh")


def test_full_disk_while_finishing_an_update_keeps_the_old_store_and_the_new_work(image_folder, tmp_path, monkeypatch):
    store = tmp_path / "store"
    run_proposals(image_folder, store, config(), progress=False)
    before = ProposalStore(store)
    old_fingerprints = np.asarray(before.fingerprints).copy()
    for name in ("group0/scene_000.jpg", "group2/scene_005.png"):
        synthetic_scene(900, 160, 120).save(image_folder / name)
    real_save = np.save

    def save(file, array, *args, **kwargs):
        if Path(getattr(file, "name", "")).name.startswith(".boxes."):  # the temporary file of boxes.npy
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(ProposalStoreError, match=(
        f"^no space left on device while writing {store / PARTS_DIR / 'staged' / 'boxes.npy'}; "
        "the work so far is kept"
    )):
        run_proposals(image_folder, store, config(), progress=False)
    monkeypatch.undo()
    np.testing.assert_array_equal(ProposalStore(store).fingerprints, old_fingerprints)  # the old store is whole
    assert len(read_log(store / PARTS_DIR / Shard().log_name())[0]) == 2  # and the two new images are kept

    finished = run_proposals(image_folder, store, config(), progress=False)
    assert finished.computed_now == 0 and finished.update["changed"] == 2
    run_proposals(image_folder, tmp_path / "fresh", config(), progress=False)
    assert_same_store(store, tmp_path / "fresh")


def test_unreadable_subfolder_is_recorded_and_the_run_goes_on(image_folder, tmp_path, monkeypatch):
    # Tests run as root, where chmod 000 does not stop reading: the folder refuses through scandir instead.
    real_scandir = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path).name == "group1":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    store = tmp_path / "store"
    summary = run_proposals(image_folder, store, config(), progress=False)
    assert summary.finished and (summary.images, summary.failures) == (6, 1)  # 5 images and the folder
    opened = ProposalStore(store)
    assert opened.failures() == {"group1/": "cannot read folder (Permission denied)"}
    assert len(opened.valid_indices()) == 5 and opened.failed_count == 1
    assert left_out_message(opened) == f"1 unreadable folder left out: see {store / 'failures.json'}"
    opened.check_images(image_folder, fingerprint_sample=None)  # training accepts the same folder

    monkeypatch.undo()  # the folder became readable
    updated = run_proposals(image_folder, store, config(), progress=False)
    assert updated.update == {"changed": 0, "added": 3, "removed": 1, "retried": 0} and updated.computed_now == 3
    run_proposals(image_folder, tmp_path / "fresh", config(), progress=False)
    assert_same_store(store, tmp_path / "fresh")


HOLD_LOCK_SCRIPT = """
import sys, time
from pathlib import Path
from soco.data.proposals.pipeline import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_locked_output_is_refused_naming_the_holder(image_folder, tmp_path):
    store = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_SCRIPT, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ProposalStoreError, match=rf"is in use by another `soco proposals` run \(pid {holder.pid},"):
            run_proposals(image_folder, store, config(), progress=False)
        assert not (store / PARTS_DIR).exists()  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert run_proposals(image_folder, store, config(), progress=False).computed_now == 8  # the lock died with it


def test_shards_lock_only_their_own_share(image_folder, tmp_path):
    store = tmp_path / "store"
    with output_lock(store, Shard(0, 2).lock_name()):
        assert run_proposals(image_folder, store, config(), Shard(1, 2), progress=False).computed_now == 4
        with pytest.raises(ProposalStoreError, match=rf"pid {os.getpid()},"):
            run_proposals(image_folder, store, config(), Shard(0, 2), progress=False)
    assert run_proposals(image_folder, store, config(), Shard(0, 2), progress=False).finished
