"""Restore planning: only the newest file covering a byte writes it; FileSource reads it."""

from __future__ import annotations

import random
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format.checked import Expected, Ledger
from libvirtnbdbackup.format.frames import Kind
from libvirtnbdbackup.format.index import Extent as IndexExtent
from libvirtnbdbackup.format.index import FileIndex, build_index
from libvirtnbdbackup.jobs import restore
from libvirtnbdbackup.jobs.restore import FileSource, Write, plan_writes
from tests.unit.test_stream_roundtrip import Compression, Extent, write_stream

SIZE = 300


def file_index(extents: list[IndexExtent]) -> FileIndex:
    return FileIndex("f.data", 0, "", SIZE, False, extents)


@st.composite
def chain_indexes(draw: st.DrawFn) -> list[FileIndex]:
    """Files of a chain: sorted, disjoint data and zero frames each."""
    files = []
    for _ in range(draw(st.integers(1, 5))):
        extents = []
        pos = draw(st.integers(0, 30))
        while pos < SIZE and len(extents) < 8:
            end = min(SIZE, pos + draw(st.integers(1, 80)))
            data = draw(st.booleans())
            extents.append(IndexExtent(pos, end - pos, 1000 + pos if data else -1))
            pos = end + draw(st.integers(0, 40))
        files.append(file_index(extents))
    return files


def byte_of(layer: int, offset: int) -> int:
    return 1 + (layer * 37 + offset) % 255  # never zero


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain_indexes())
def test_plan_gives_the_image_of_applying_every_file(files: list[FileIndex]) -> None:
    expected = bytearray(SIZE)  # a fresh image reads as zeros
    for layer, index in enumerate(files):
        for e in index.extents:
            for x in range(e.start, e.start + e.length):
                expected[x] = 0 if e.is_zero else byte_of(layer, x)

    image = bytearray(SIZE)
    written: list[int] = []
    for layer, writes in enumerate(plan_writes(files, SIZE)):
        assert writes == sorted(writes, key=lambda w: w[1])
        for extent, start, end in writes:
            assert not extent.is_zero
            assert extent.start <= start < end <= extent.start + extent.length
            image[start:end] = bytes(byte_of(layer, x) for x in range(start, end))
            written += range(start, end)
    assert image == expected
    assert len(written) == len(set(written)), "writes overlap: data was written twice"
    # Every byte written is final: nothing a later file overwrites is written.
    assert len(written) == sum(1 for x in expected if x)


def test_a_zero_frame_of_an_inc_wins_over_data_of_the_full() -> None:
    full = file_index([IndexExtent(0, 100, 40), IndexExtent(100, 100, -1)])
    inc = file_index([IndexExtent(50, 100, -1), IndexExtent(180, 10, 40)])
    plan = plan_writes([full, inc], SIZE)
    assert [(s, e) for _x, s, e in plan[0]] == [(0, 50)]
    assert [(s, e) for _x, s, e in plan[1]] == [(180, 190)]


def all_chunks(src: FileSource, writes: list[Write]) -> Iterator[tuple[int, memoryview]]:
    """Every unit of ``writes``, in order, as one thread would write them."""
    for unit in src.units(writes):
        yield from src.unit_chunks(unit)


def planned_file(
    folder: Path, extents: list[Extent], compressed: Compression
) -> tuple[Path, list[list[Write]]]:
    """A 40,000-byte disk's data file (pieces of 4096), and the restore plan
    of it under a later file whose data covers [3000, 13000)."""
    raw, _, _ = write_stream(extents, 40000, compressed, max_piece=4096)
    path = folder / "vda.full.data"
    path.write_bytes(raw)
    with path.open("rb") as fh:
        index = build_index(fh, str(path))
    later = FileIndex("inc", 0, "", 40000, False, [IndexExtent(3000, 10000, 0)])
    return path, plan_writes([index, later], 40000)


@pytest.mark.parametrize("compressed", [False, 2])
def test_file_source_returns_the_planned_bytes(tmp_path: Path, compressed: Compression) -> None:
    data = bytes(range(256)) * 40 + b"text " * 3000  # 25,240 bytes: pieces of 4096
    extents = [
        Extent(Kind.ZERO, 0, 1000),
        Extent(Kind.DATA, 1000, len(data), data, (7, 5000)),
        Extent(Kind.DATA, 1000 + len(data), 3, b"end"),
    ]
    path, plan = planned_file(tmp_path, extents, compressed)
    got = bytearray(40000)
    with FileSource(path, compressed is not False) as src:
        for offset, chunk in all_chunks(src, plan[0]):
            got[offset : offset + len(chunk)] = chunk
    expected = bytearray(40000)
    expected[1000 : 1000 + len(data)] = data
    expected[1000 + len(data) : 1003 + len(data)] = b"end"
    expected[3000:13000] = bytes(10000)  # the later file's part is not taken from this one
    assert got == expected


def test_file_source_names_damaged_compressed_data(tmp_path: Path) -> None:
    raw, _, _ = write_stream([Extent(Kind.DATA, 0, 9000, b"abc" * 3000)], 9000, 2, max_piece=4096)
    path = tmp_path / "vda.full.data"
    path.write_bytes(raw)
    with path.open("rb") as fh:
        index = build_index(fh, str(path))
    extent = index.extents[0]
    second = extent.offset + extent.pieces[0][0]  # file offset of the second piece
    damaged = bytearray(raw)
    damaged[second + extent.pieces[1][0] // 2] ^= 0xFF
    path.write_bytes(damaged)
    plan = plan_writes([index], 9000)
    with FileSource(path, True) as src:  # noqa: SIM117
        with pytest.raises(StreamError, match=f"vda.full.data at offset {second}"):
            for _ in all_chunks(src, plan[0]):
                pass


def test_a_literal_byte_flipped_in_a_compressed_piece_fails_the_file_checksum(
    tmp_path: Path,
) -> None:
    """With a checksum for the file, lz4's xxHash is not computed: the
    damaged literal decompresses to a wrong byte, which the file's Adler-32
    (made of what the restore read) refuses before the image counts."""
    data = bytes(random.Random(5).randbytes(9000))  # incompressible: stored as literals
    raw, _, _ = write_stream(
        [Extent(Kind.DATA, 0, len(data), data)], len(data), 2, max_piece=1 << 20
    )
    path = tmp_path / "vda.full.data"
    with_checksum = Expected(path.name, len(raw), zlib.adler32(raw), "its manifest")
    damaged = bytearray(raw)
    damaged[raw.index(data[4000:4064]) + 10] ^= 0x01
    path.write_bytes(damaged)
    with path.open("rb") as fh:
        plan = plan_writes([build_index(fh, str(path))], len(data))
    with FileSource(path, True, Ledger(path, with_checksum)) as src:
        got = bytearray(len(data))
        for offset, chunk in all_chunks(src, plan[0]):
            got[offset : offset + len(chunk)] = chunk
        assert got != data  # no frame checksum stopped it
        with pytest.raises(StreamError, match=r"vda\.full\.data: checksum .* the file is damaged"):
            src.verify()
    with FileSource(path, True) as src:  # noqa: SIM117
        with pytest.raises(StreamError, match="damaged"):  # no file checksum: xxHash is checked
            for _ in all_chunks(src, plan[0]):
                pass


@pytest.mark.parametrize("compressed", [False, 2])
def test_units_written_in_any_order_by_many_threads_give_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compressed: Compression
) -> None:
    # Small slices: a piece is decompressed over many calls, as a 32 MiB one is.
    monkeypatch.setattr(restore, "CHUNK", 1000)
    data = bytes(range(256)) * 40 + b"text " * 3000
    extents = [Extent(Kind.DATA, 0, len(data), data), Extent(Kind.DATA, 30000, 5000, data[:5000])]
    path, plan = planned_file(tmp_path, extents, compressed)
    writes = plan[0]
    with FileSource(path, compressed is not False) as src:
        in_order = bytearray(40000)
        for offset, chunk in all_chunks(src, writes):
            in_order[offset : offset + len(chunk)] = chunk
        units = list(src.units(writes))
        assert len(units) >= 3
        random.Random(7).shuffle(units)
        shuffled = bytearray(40000)
        lock = threading.Lock()

        def apply(unit: object) -> None:
            for offset, chunk in src.unit_chunks(unit):  # type: ignore[arg-type]
                with lock:
                    shuffled[offset : offset + len(chunk)] = chunk

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(apply, units))
    expected = bytearray(40000)
    expected[: len(data)] = data
    expected[30000:35000] = data[:5000]
    expected[3000:13000] = bytes(10000)  # the later file writes these
    assert in_order == expected
    assert shuffled == expected
