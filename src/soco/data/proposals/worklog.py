"""Append-only log of finished images: what makes a killed proposal run resumable image by image.

Each record is framed as MAGIC, payload length, CRC32 of the payload, then the payload, so that a
record torn by a kill is detected on reopening and cut away; every record before it is kept.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from soco.data.proposals.store import ImageRecord

MAGIC = b"SPR1"
_FRAME = struct.Struct("<4sII")  # magic, payload length, crc32
_FIXED = struct.Struct("<IQqiiibI")  # path len, fingerprint, byte size, w, h, raw count, level, n boxes


def encode_record(record: ImageRecord) -> bytes:
    """One framed record, ready to append."""
    path = record.path.encode("utf-8")
    boxes = np.ascontiguousarray(record.boxes, dtype="<f4").reshape(-1, 4)
    payload = (
        _FIXED.pack(
            len(path),
            record.fingerprint,
            record.byte_size,
            record.width,
            record.height,
            record.raw_count,
            record.level,
            len(boxes),
        )
        + path
        + boxes.tobytes()
        + record.reason.encode("utf-8")
    )
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> ImageRecord:
    """The ImageRecord inside one record's payload."""
    path_len, fingerprint, byte_size, width, height, raw_count, level, n_boxes = _FIXED.unpack_from(payload)
    offset = _FIXED.size
    path = payload[offset : offset + path_len].decode("utf-8")
    offset += path_len
    boxes = np.frombuffer(payload, dtype="<f4", count=n_boxes * 4, offset=offset).reshape(-1, 4).copy()
    offset += n_boxes * 16
    reason = payload[offset:].decode("utf-8")
    return ImageRecord(path, fingerprint, byte_size, width, height, level, raw_count, boxes, reason)


def read_log(path: str | Path) -> tuple[list[ImageRecord], int]:
    """All intact records of a log and the byte length they span (a torn tail is not counted)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records, offset = [], 0
    while offset + _FRAME.size <= len(data):
        magic, length, crc = _FRAME.unpack_from(data, offset)
        start, end = offset + _FRAME.size, offset + _FRAME.size + length
        if magic != MAGIC or end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        records.append(decode_payload(data[start:end]))
        offset = end
    return records, offset


class WorkLog:
    """An open log for appending records; reopening cuts any torn record left by a kill."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records, valid_length = read_log(self.path)
        # Unbuffered: a record is handed to the OS by append itself, and a failed write (a full disk)
        # leaves nothing queued that a later flush would add behind a cut record.
        self._handle = open(self.path, "ab", buffering=0)
        if self._handle.tell() != valid_length:
            self._handle.truncate(valid_length)
            self._handle.seek(valid_length)
        self._length = valid_length

    def append(self, record: ImageRecord) -> None:
        """Append one record and hand it to the OS at once (a killed process loses nothing written).

        When the write fails (no space left), the partial record is cut away and the error raised, so
        the log keeps every earlier record and stays appendable.
        """
        data = memoryview(encode_record(record))
        try:
            while data:
                written = self._handle.write(data)
                data = data[written:]
        except OSError:
            try:
                self._handle.truncate(self._length)
                self._handle.seek(self._length)
            except OSError:
                pass  # a torn tail is cut on the next opening anyway
            raise
        self._length = self._handle.tell()

    def sync(self) -> None:
        """Force written records to disk (protects against power loss, not only process kills)."""
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Sync and close."""
        if not self._handle.closed:
            try:
                self.sync()
            finally:
                self._handle.close()

    def __enter__(self) -> WorkLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
