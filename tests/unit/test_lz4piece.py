"""One LZ4 piece decompressed a slice at a time: the bytes, and every damage refused."""

from __future__ import annotations

import os
from pathlib import Path

import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format.lz4piece import decompressed_slices

from .test_lz4_identity import SEGMENTS, as_247, disk_like

PREFIX = b"x" * 1000  # the piece lies inside a file, not at its start


def stored(tmp_path: Path, frame: bytes, after: bytes = b"\r\n") -> int:
    path = tmp_path / "piece"
    path.write_bytes(PREFIX + frame + after)
    return os.open(path, os.O_RDONLY)


def slices(fd: int, frame_size: int, length: int, slice_size: int) -> list[bytes]:
    return list(decompressed_slices(fd, len(PREFIX), frame_size, length, "f", slice_size))


@given(
    segments=SEGMENTS,
    seed=st.integers(0, 2**16),
    slice_size=st.sampled_from([4096, 65536, 100_000, 1 << 20]),
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_slices_are_the_piece(
    tmp_path: Path, segments: list[tuple[str, int]], seed: int, slice_size: int
) -> None:
    data = disk_like(segments, seed)
    frame = as_247(data, 2)
    fd = stored(tmp_path, frame)
    try:
        got = slices(fd, len(frame), len(data), slice_size)
    finally:
        os.close(fd)
    assert b"".join(got) == data
    assert all(0 < len(s) <= slice_size for s in got)


DATA = disk_like([("text", 300_000), ("random", 100_000), ("zero", 200_000)], 1)
FRAME = lz4.frame.compress(DATA, block_checksum=True, content_checksum=True)


def flipped(at: int) -> bytes:
    return FRAME[:at] + bytes([FRAME[at] ^ 0x40]) + FRAME[at + 1 :]


@pytest.mark.parametrize(
    ("frame", "frame_size", "length", "message"),
    [
        (FRAME, len(FRAME), len(DATA) - 1, "does not hold"),  # the index says otherwise
        (FRAME, len(FRAME) - 7, len(DATA), "does not hold|damaged"),  # stored bytes cut short
        (FRAME + b"\0" * 9, len(FRAME) + 9, len(DATA), "does not hold"),  # bytes after it
        (flipped(len(FRAME) // 2), len(FRAME), len(DATA), "damaged"),  # a block checksum
        (flipped(len(FRAME) - 2), len(FRAME), len(DATA), "damaged"),  # the content checksum
        (flipped(6), len(FRAME), len(DATA), "damaged"),  # the frame header
    ],
)
def test_a_damaged_piece_is_refused(
    tmp_path: Path, frame: bytes, frame_size: int, length: int, message: str
) -> None:
    fd = stored(tmp_path, frame)
    try:
        with pytest.raises(StreamError, match=message):
            slices(fd, frame_size, length, 65536)
    finally:
        os.close(fd)


def test_a_file_that_ends_inside_the_piece_is_truncated(tmp_path: Path) -> None:
    fd = stored(tmp_path, FRAME[:5000], after=b"")
    try:
        with pytest.raises(StreamError, match="truncated"):
            slices(fd, len(FRAME), len(DATA), 4096)
    finally:
        os.close(fd)
