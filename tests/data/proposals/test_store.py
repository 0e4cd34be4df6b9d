"""The proposal store: round trip, O(1) lookup by path, and the work log's torn-record recovery."""

import json

import numpy as np
import pytest

from soco.data.proposals.store import (
    FAILED_LEVEL,
    ImageRecord,
    ProposalStore,
    left_out_message,
    write_store,
)
from soco.data.proposals.worklog import WorkLog, encode_record, read_log
from soco.errors import ProposalStoreError


def make_records():
    rng = np.random.default_rng(0)
    records = []
    for number, path in enumerate(["b/two.jpg", "a/one.png", "ünï/çødé.webp", "c.bmp"]):
        count = number + 1
        boxes = rng.uniform(0, 300, size=(count, 4)).astype(np.float32)
        records.append(ImageRecord(path, 2**64 - 1 - number, 1000 + number, 320, 240, number % 4, 50 + count, boxes))
    records.append(ImageRecord("bad.jpg", 7, 3, 0, 0, FAILED_LEVEL, 0, np.zeros((0, 4), np.float32), "truncated image"))
    return records


def test_round_trip_keeps_every_field(tmp_path):
    records = make_records()
    write_store(tmp_path / "store", records, {"algorithm": "fast", "algorithm_params": {"x": 1}})
    store = ProposalStore(tmp_path / "store")
    assert len(store) == 5
    assert store.paths() == sorted(r.path for r in records)
    for record in records:
        index = store.index_of(record.path)
        back = store.record(index)
        assert back.path == record.path
        assert back.fingerprint == record.fingerprint
        assert back.byte_size == record.byte_size
        assert (back.width, back.height, back.level, back.raw_count) == (
            record.width, record.height, record.level, record.raw_count,
        )
        np.testing.assert_array_equal(store.boxes(record.path), record.boxes)
        assert back.reason == record.reason
    assert store.failures() == {"bad.jpg": "truncated image"}
    assert list(store.valid_indices()) == [i for i, p in enumerate(store.paths()) if p != "bad.jpg"]
    assert store.meta["num_boxes"] == 1 + 2 + 3 + 4
    assert store.meta["num_failed"] == 1
    assert store.algorithm == "fast"


def test_lookup_of_missing_path_raises_key_error(tmp_path):
    write_store(tmp_path / "s", make_records(), {"algorithm": "fast"})
    store = ProposalStore(tmp_path / "s")
    with pytest.raises(KeyError):
        store.index_of("a/one.PNG")
    assert "a/one.png" in store and "zzz.png" not in store


def test_lookup_with_many_colliding_slots(tmp_path):
    # 3000 entries fill a 8192-slot table to 37%: probing chains must still find every path.
    records = [
        ImageRecord(f"dir{i % 7}/img_{i:05d}.jpg", i, i, 10, 10, 0, 1, np.full((1, 4), i, np.float32))
        for i in range(3000)
    ]
    write_store(tmp_path / "s", records, {"algorithm": "fast"})
    store = ProposalStore(tmp_path / "s")
    for i in (0, 1, 1234, 2999):
        index = store.index_of(f"dir{i % 7}/img_{i:05d}.jpg")
        assert store.boxes(index)[0, 0] == i


def test_unfinished_or_foreign_folders_are_refused(tmp_path):
    with pytest.raises(ProposalStoreError, match="does not exist"):
        ProposalStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProposalStoreError, match="empty is not a proposal store"):
        ProposalStore(tmp_path / "empty")
    (tmp_path / "half" / "parts").mkdir(parents=True)
    (tmp_path / "half" / "parts" / "run.json").write_text("{}")
    with pytest.raises(ProposalStoreError, match="not a finished proposal store.*again to finish it"):
        ProposalStore(tmp_path / "half")
    write_store(tmp_path / "old", make_records(), {"algorithm": "fast"})
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    meta["version"] = 99
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ProposalStoreError, match="version 99"):
        ProposalStore(tmp_path / "old")


def test_work_log_cuts_a_torn_record_and_keeps_the_rest(tmp_path):
    records = make_records()
    log_path = tmp_path / "shard.log"
    with WorkLog(log_path) as log:
        for record in records[:3]:
            log.append(record)
    # A kill in the middle of a write leaves part of the fourth record.
    partial = encode_record(records[3])[:-5]
    with open(log_path, "ab") as handle:
        handle.write(partial)
    intact, length = read_log(log_path)
    assert [r.path for r in intact] == [r.path for r in records[:3]]
    with WorkLog(log_path) as log:
        assert len(log.records) == 3
        log.append(records[3])
    back, _ = read_log(log_path)
    assert [r.path for r in back] == [r.path for r in records[:4]]
    np.testing.assert_array_equal(back[3].boxes, records[3].boxes)
    assert back[3].fingerprint == records[3].fingerprint


def test_work_log_detects_a_corrupted_byte(tmp_path):
    log_path = tmp_path / "shard.log"
    with WorkLog(log_path) as log:
        for record in make_records()[:2]:
            log.append(record)
    data = bytearray(log_path.read_bytes())
    data[-3] ^= 0xFF  # flip a byte inside the second record's payload
    log_path.write_bytes(bytes(data))
    intact, _ = read_log(log_path)
    assert len(intact) == 1


def write_example(folder):
    """The example store; sorted, its images hold 2, 1, 0 (failed), 4 and 3 boxes: offsets 0 2 3 3 7 10."""
    write_store(folder, make_records(), {"algorithm": "fast"})
    np.testing.assert_array_equal(np.load(folder / "box_offsets.npy"), [0, 2, 3, 3, 7, 10])
    return folder


def change_array(folder, name, change):
    array = np.load(folder / f"{name}.npy").copy()
    array = change(array)
    with open(folder / f"{name}.npy", "wb") as handle:
        np.save(handle, array)


def set_value(index, value):
    def change(array):
        array[index] = value
        return array

    return change


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        # One shifted offset that keeps them increasing: image 1 would get image 0's second box.
        (lambda f: change_array(f, "box_offsets", set_value(1, 1)), "box_offsets.npy", "sums to 24, meta.json recorded 25"),
        (lambda f: change_array(f, "box_offsets", set_value(1, 5)), "box_offsets.npy", r"decreases at image 1 \(5 > 3\)"),
        (lambda f: change_array(f, "box_offsets", set_value(0, 1)), "box_offsets.npy", "starts at 1, not 0"),
        (lambda f: change_array(f, "box_offsets", set_value(5, 9)), "box_offsets.npy",
         "ends at 9, the number of boxes in boxes.npy is 10"),
        (lambda f: change_array(f, "path_offsets", set_value(2, 12)), "path_offsets.npy", "sums to"),
        (lambda f: change_array(f, "box_offsets", lambda a: a[:5]), "box_offsets.npy",
         r"has shape \(5,\), expected 6 for 5 images"),
        (lambda f: change_array(f, "levels", lambda a: a[:4]), "levels.npy", r"has shape \(4,\), expected 5 for 5 images"),
        (lambda f: change_array(f, "boxes", lambda a: a[:9]), "box_offsets.npy",
         "ends at 10, the number of boxes in boxes.npy is 9"),
        (lambda f: change_array(f, "levels", set_value(0, FAILED_LEVEL)), "failures.json",
         "lists 1 failures, levels.npy marks 2 images failed"),
        (lambda f: change_array(f, "raw_counts", lambda a: a.astype(np.int64)), "raw_counts.npy",
         "has dtype int64, expected int32"),
        (lambda f: (f / "failures.json").write_text("{}"), "failures.json", "lists 0 failures, levels.npy marks 1"),
        (lambda f: (f / "boxes.npy").write_bytes(b""), "boxes.npy", r"is empty \(0 bytes\)"),
        (lambda f: (f / "boxes.npy").write_bytes((f / "boxes.npy").read_bytes()[:150]), "boxes.npy",
         "is truncated or unparsable"),
        (lambda f: (f / "sizes.npy").unlink(), "sizes.npy", "is missing"),
        (lambda f: (f / "meta.json").write_bytes(b""), "meta.json", "is empty"),
        (lambda f: (f / "failures.json").write_text('{"bad.jpg": "trunc'), "failures.json", "is truncated or unparsable"),
    ],
)
def test_a_damaged_store_is_refused_naming_the_file(tmp_path, damage, file, problem):
    folder = write_example(tmp_path / "store")
    ProposalStore(folder)  # whole, it opens
    damage(folder)
    with pytest.raises(ProposalStoreError, match=f"^proposal store file {folder / file} {problem}.*: the store is damaged"):
        ProposalStore(folder)


def test_a_damaged_lookup_table_never_returns_another_image(tmp_path):
    folder = write_example(tmp_path / "store")
    change_array(folder, "path_table", lambda table: np.where(table >= 0, 99, table))
    store = ProposalStore(folder)
    with pytest.raises(ProposalStoreError, match="path_table.npy points to image 99 of 5"):
        store.index_of("a/one.png")


def test_left_out_message_counts_the_failures(tmp_path):
    store = ProposalStore(write_example(tmp_path / "store"))
    assert store.failed_count == 1
    assert left_out_message(store) == f"1 image left out (failed proposals): see {tmp_path / 'store' / 'failures.json'}"
    records = make_records()
    records[0] = ImageRecord("x.jpg", 1, 1, 0, 0, FAILED_LEVEL, 0, np.zeros((0, 4), np.float32), "truncated image")
    records.append(ImageRecord("locked/", 0, 0, 0, 0, FAILED_LEVEL, 0, np.zeros((0, 4), np.float32), "cannot read folder"))
    write_store(tmp_path / "more", records, {"algorithm": "fast"})
    assert left_out_message(ProposalStore(tmp_path / "more")) == (
        f"2 images left out (failed proposals), 1 unreadable folder left out: see {tmp_path / 'more' / 'failures.json'}"
    )
    write_store(tmp_path / "clean", make_records()[:4], {"algorithm": "fast"})
    assert left_out_message(ProposalStore(tmp_path / "clean")) is None
