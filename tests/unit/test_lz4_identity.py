"""lz4 payloads are byte for byte those of virtnbdbackup 2.47.

2.47 compresses each piece (an extent, or a 32 MiB part of a longer one) in
one call: ``lz4.frame.compress(data, content_checksum=True,
block_checksum=True, compression_level=level)``, with lz4's default 64 KiB
linked blocks and the content size stored. Ours compresses the same pieces
as their bytes arrive; these tests compare the two on compressible data,
where a streaming compressor that loses its window between calls makes
other (valid, but different) bytes.
"""

from __future__ import annotations

import io
import itertools
import random
import threading
from collections.abc import Iterator

import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.format.frames import MAX_REQUEST_SIZE
from libvirtnbdbackup.format.index import FileIndex
from libvirtnbdbackup.format.writer import LZ4_BLOCK, PieceCompressor, StreamWriter, piece_lengths
from libvirtnbdbackup.jobs import compresslanes
from libvirtnbdbackup.jobs.compresslanes import CompressionLanes

from .samples import sample_meta

MiB = 1024 * 1024
LEVELS = st.integers(min_value=0, max_value=16)  # what -z accepts


def as_247(data: bytes, level: int) -> bytes:
    """The frame 2.47 writes for one piece."""
    return lz4.frame.compress(
        data, content_checksum=True, block_checksum=True, compression_level=level
    )


def words(rng: random.Random, n: int) -> bytes:
    vocabulary = [rng.randbytes(rng.randint(1, 6)).hex().encode() for _ in range(200)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(vocabulary) + b" "
    return bytes(out[:n])


def disk_like(segments: list[tuple[str, int]], seed: int) -> bytes:
    """Runs of zeros, short repeated patterns, text and random bytes: what
    disks hold, and what makes lz4 find matches across block boundaries."""
    rng = random.Random(seed)
    out = bytearray()
    for kind, n in segments:
        if kind == "zero":
            out += bytes(n)
        elif kind == "pattern":
            unit = rng.randbytes(rng.randint(1, 9))
            out += (unit * (n // len(unit) + 1))[:n]
        elif kind == "text":
            out += words(rng, n)
        else:
            out += rng.randbytes(n)
    return bytes(out)


SEGMENTS = st.lists(
    st.tuples(
        st.sampled_from(["zero", "pattern", "text", "random"]),
        st.integers(min_value=1, max_value=400_000),
    ),
    min_size=1,
    max_size=8,
)
# How the bytes arrive: NBD read sizes, and cuts that line up with nothing.
FEEDS = st.sampled_from([512 * 1024, 1024 * 1024, LZ4_BLOCK, LZ4_BLOCK + 1, 700, 99_999])


def fed(data: bytes, level: int, chunk: int) -> bytes:
    packer = PieceCompressor(len(data), level)
    parts: list[bytes] = []
    view = memoryview(data)
    for pos in range(0, len(data), chunk):
        parts += packer.feed(view[pos : pos + chunk])
    return b"".join(parts + packer.finish())


@given(segments=SEGMENTS, seed=st.integers(0, 2**16), level=LEVELS, chunk=FEEDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_piece_is_the_frame_2_47_writes(
    segments: list[tuple[str, int]], seed: int, level: int, chunk: int
) -> None:
    data = disk_like(segments, seed)
    assert fed(data, level, chunk) == as_247(data, level)


@pytest.mark.parametrize("length", [0, 1, LZ4_BLOCK - 1, LZ4_BLOCK, LZ4_BLOCK + 1, 2 * LZ4_BLOCK])
@pytest.mark.parametrize("level", [0, 2, 9, 12])
def test_pieces_around_one_block_are_the_frames_2_47_writes(length: int, level: int) -> None:
    data = disk_like([("text", length)], length) if length else b""
    assert fed(data, level, 4096) == as_247(data, level)


def test_a_3_mib_extent_of_text_is_the_frame_2_47_writes() -> None:
    # The case of issue 15: 13181 bytes from us against 13176 from 2.47.
    data = disk_like([("text", 3 * MiB)], 15)
    assert fed(data, 2, 512 * 1024) == as_247(data, 2)


def extent_payloads(raw: bytes, index: FileIndex) -> list[list[bytes]]:
    """Each data extent's LZ4 frames as they lie in the file."""
    frames = []
    for extent in index.extents:
        if extent.is_zero:
            continue
        pos = extent.offset
        pieces = []
        for packed, _unpacked in extent.pieces:
            pieces.append(raw[pos : pos + packed])
            pos += packed
        frames.append(pieces)
    return frames


@pytest.mark.parametrize("level", [2, 9])
def test_an_extent_split_into_32_mib_pieces_is_what_2_47_writes(level: int) -> None:
    length = MAX_REQUEST_SIZE + 3 * MiB + 12345
    data = disk_like([("text", 20 * MiB), ("zero", 5 * MiB), ("pattern", length - 25 * MiB)], 7)
    out = io.BytesIO()
    meta = sample_meta(virtual_size=64 * MiB, data_size=length, compressed=level)
    writer = StreamWriter(out, meta)  # 2.47's pieces: 32 MiB, the rest
    view = memoryview(data)
    writer.data(0, length, (view[p : p + 512 * 1024] for p in range(0, length, 512 * 1024)))
    writer.finish()
    cuts = list(itertools.accumulate(piece_lengths(length, MAX_REQUEST_SIZE), initial=0))
    expected = [as_247(data[a:b], level) for a, b in itertools.pairwise(cuts)]
    assert len(expected) == 2
    assert extent_payloads(out.getvalue(), writer.index("vda.full.data")) == [expected]


class _Disk:
    """A made-up disk of compressible bytes, read in NBD-sized chunks."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(
        self, ranges: list[tuple[int, int]], chunk: int = 512 * 1024, depth: int = 8
    ) -> Iterator[tuple[int, memoryview]]:
        for start, length in ranges:
            for offset in range(start, start + length, chunk):
                n = min(chunk, start + length - offset)
                yield offset, memoryview(self.data[offset : offset + n])

    def close(self) -> None:
        pass


def test_compression_lanes_make_the_frames_2_47_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compresslanes, "TASK_BYTES", 4 * MiB)
    data = disk_like([("text", 6 * MiB), ("zero", MiB), ("pattern", 3 * MiB)], 3)
    extents = [(0, 3 * MiB), (3 * MiB + 4096, 5 * MiB), (9 * MiB, 300_000)]
    max_piece = 2 * MiB
    disk = _Disk(data)
    expected = []
    for start, length in extents:
        for n in piece_lengths(length, max_piece):
            expected.append(as_247(data[start : start + n], 2))
            start += n
    with CompressionLanes(
        lambda: disk,  # type: ignore[arg-type,return-value]
        extents,
        max_piece=max_piece,
        level=2,
        lanes=2,
        progress=lambda _n: None,
        cancel=threading.Event(),
        disk="vda",
    ) as lanes:
        got = [b"".join(lanes.next_piece()) for _ in expected]
    assert got == expected
