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


def slices(
    fd: int,
    frame_size: int,
    length: int,
    slice_size: int,
    check: bool = True,
    reuse: bool = True,
) -> list[bytes]:
    """Each slice copied as it comes: a reused buffer holds the next one after."""
    own = (lambda n: memoryview(bytearray(n))) if not reuse else None
    pieces = decompressed_slices(
        fd, len(PREFIX), frame_size, length, "f", slice_size, check=check, allocate=own
    )
    return [bytes(s) for s in pieces]


@given(
    segments=SEGMENTS,
    seed=st.integers(0, 2**16),
    slice_size=st.sampled_from([4096, 65536, 100_000, 1 << 20]),
    check=st.booleans(),
    reuse=st.booleans(),
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_slices_are_the_piece(
    tmp_path: Path,
    segments: list[tuple[str, int]],
    seed: int,
    slice_size: int,
    check: bool,
    reuse: bool,
) -> None:
    data = disk_like(segments, seed)
    frame = as_247(data, 2)
    fd = stored(tmp_path, frame)
    try:
        got = slices(fd, len(frame), len(data), slice_size, check, reuse)
    finally:
        os.close(fd)
    assert b"".join(got) == data
    # Full slices but the last: large writes, and no cache memory held idle.
    assert all(len(s) == slice_size for s in got[:-1])
    assert 0 < len(got[-1]) <= slice_size


def test_slices_of_their_own_stay_valid(tmp_path: Path) -> None:
    fd = stored(tmp_path, FRAME)
    try:
        kept = list(
            decompressed_slices(
                fd,
                len(PREFIX),
                len(FRAME),
                len(DATA),
                "f",
                65536,
                allocate=lambda n: memoryview(bytearray(n)),
            )
        )
    finally:
        os.close(fd)
    assert b"".join(kept) == DATA


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


@pytest.mark.parametrize(
    ("frame", "frame_size", "length"),
    [
        (FRAME, len(FRAME), len(DATA) - 1),
        (FRAME, len(FRAME) - 7, len(DATA)),
        (FRAME + b"\0" * 9, len(FRAME) + 9, len(DATA)),
        (FRAME, len(FRAME), len(DATA) + 1),
        (flipped(6), len(FRAME), len(DATA)),
    ],
)
def test_without_checksums_a_piece_of_the_wrong_shape_is_still_refused(
    tmp_path: Path, frame: bytes, frame_size: int, length: int
) -> None:
    """What the file's Adler-32 cannot see: the piece against its index."""
    fd = stored(tmp_path, frame)
    try:
        with pytest.raises(StreamError, match=r"does not hold|damaged"):
            slices(fd, frame_size, length, 65536, check=False)
    finally:
        os.close(fd)


def test_a_file_that_ends_inside_the_piece_is_truncated(tmp_path: Path) -> None:
    fd = stored(tmp_path, FRAME[:5000], after=b"")
    try:
        with pytest.raises(StreamError, match="truncated"):
            slices(fd, len(FRAME), len(DATA), 4096)
    finally:
        os.close(fd)
