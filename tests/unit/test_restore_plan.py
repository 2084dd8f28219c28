"""Restore planning: header index of a data file, last-writer-wins writes of a chain."""

from __future__ import annotations

import io
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format.frames import Kind
from libvirtnbdbackup.format.reader import IndexedFrame, Piece, StreamReader
from libvirtnbdbackup.jobs.restore import FileSource
from libvirtnbdbackup.jobs.restoreplan import Ranges, plan_chain
from tests.unit.test_stream_roundtrip import Compression, Extent, layouts, write_stream

# --- Ranges -----------------------------------------------------------------------------------


def test_ranges_merge_touching_and_overlapping() -> None:
    r = Ranges()
    r.add(10, 20)
    r.add(30, 40)
    r.add(20, 25)  # touches the first
    r.add(5, 6)
    assert list(r) == [(5, 6), (10, 25), (30, 40)]
    r.add(0, 100)
    assert list(r) == [(0, 100)]


def test_ranges_outside_and_overlap() -> None:
    r = Ranges()
    r.add(10, 20)
    r.add(30, 40)
    assert r.outside(0, 50) == [(0, 10), (20, 30), (40, 50)]
    assert r.outside(12, 18) == []
    assert r.outside(15, 35) == [(20, 30)]
    assert r.overlap(15, 35) == [(15, 20), (30, 35)]
    assert r.overlap(40, 50) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)), max_size=12), st.data())
def test_ranges_behave_like_a_set_of_bytes(
    adds: list[tuple[int, int]], data: st.DataObject
) -> None:
    r = Ranges()
    model: set[int] = set()
    for start, length in adds:
        r.add(start, start + length)
        model.update(range(start, start + length))
    ranges = list(r)
    assert all(a < b for a, b in ranges)
    assert all(b1 < a2 for (_a1, b1), (a2, _b2) in itertools.pairwise(ranges))  # merged
    assert {x for a, b in ranges for x in range(a, b)} == model
    start = data.draw(st.integers(0, 260))
    end = data.draw(st.integers(start, 260))
    inside = {x for a, b in r.overlap(start, end) for x in range(a, b)}
    outside = {x for a, b in r.outside(start, end) for x in range(a, b)}
    assert inside == model & set(range(start, end))
    assert outside == set(range(start, end)) - model


# --- plan_chain against applying every file in turn -------------------------------------------

SIZE = 300


@st.composite
def chain_files(draw: st.DrawFn) -> list[list[IndexedFrame]]:
    """Files of a chain: sorted, disjoint data and zero frames each."""
    files = []
    for _ in range(draw(st.integers(1, 5))):
        frames = []
        pos = draw(st.integers(0, 30))
        while pos < SIZE and len(frames) < 8:
            length = draw(st.integers(1, 80))
            end = min(SIZE, pos + length)
            kind = draw(st.sampled_from([Kind.DATA, Kind.ZERO]))
            pieces = (Piece(pos, end - pos, 0, end - pos),) if kind is Kind.DATA else ()
            frames.append(IndexedFrame(kind, pos, end - pos, pieces))
            pos = end + draw(st.integers(0, 40))
        files.append(frames)
    return files


def byte_of(file_index: int, offset: int) -> int:
    return 1 + (file_index * 37 + offset) % 255  # never zero


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain_files())
def test_plan_gives_the_image_of_applying_every_file(files: list[list[IndexedFrame]]) -> None:
    expected = bytearray(SIZE)  # a fresh image reads as zeros
    for i, frames in enumerate(files):
        for f in frames:
            for x in range(f.start, f.start + f.length):
                expected[x] = byte_of(i, x) if f.kind is Kind.DATA else 0

    plan = plan_chain(files)
    image = bytearray(SIZE)
    written: list[int] = []
    for a, b in plan.zeros:
        image[a:b] = bytes(b - a)
        written += range(a, b)
    for i, writes in enumerate(plan.files):
        for frame, parts in writes:
            for a, b in parts:
                assert frame.start <= a < b <= frame.start + frame.length
                image[a:b] = bytes(byte_of(i, x) for x in range(a, b))
                written += range(a, b)
    assert image == expected
    assert len(written) == len(set(written)), "writes overlap: data was written twice"
    # Nothing a later file overwrites is written, and zeros only where data was.
    data_bytes = sum(b - a for w in plan.files for _f, parts in w for a, b in parts)
    assert data_bytes == sum(1 for x in expected if x)
    assert plan.data_bytes == data_bytes


def test_zero_frame_of_an_inc_over_data_of_the_full_is_written() -> None:
    full = [
        IndexedFrame(Kind.DATA, 0, 100, (Piece(0, 100, 0, 100),)),
        IndexedFrame(Kind.ZERO, 100, 100, ()),
    ]
    inc = [
        IndexedFrame(Kind.ZERO, 50, 100, ()),
        IndexedFrame(Kind.DATA, 180, 10, (Piece(180, 10, 0, 10),)),
    ]
    plan = plan_chain([full, inc])
    assert plan.zeros == [(50, 100)]  # 100-150 was never data: a fresh image has zeros there
    assert [parts for _f, parts in plan.files[0]] == [[(0, 50)]]
    assert [parts for _f, parts in plan.files[1]] == [[(180, 190)]]


# --- index() and FileSource over files the writer wrote ---------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=layouts(),
    compressed=st.one_of(st.just(False), st.integers(0, 4)),
    max_piece=st.integers(64, 700),
)
def test_index_finds_every_payload(
    layout: tuple[int, list[Extent]], compressed: Compression, max_piece: int
) -> None:
    virtual_size, extents = layout
    raw, _, _ = write_stream(extents, virtual_size, compressed, max_piece=max_piece)
    index = StreamReader(io.BytesIO(raw), "test.data").index()
    assert [(f.kind, f.start, f.length) for f in index] == [
        (e.kind, e.start, e.length) for e in extents
    ]
    for frame, extent in zip(index, extents, strict=True):
        if frame.kind is Kind.ZERO:
            assert frame.pieces == ()
            continue
        payload = b""
        for piece in frame.pieces:
            stored = raw[piece.position : piece.position + piece.stored]
            got = lz4.frame.decompress(stored) if compressed is not False else stored
            assert len(got) == piece.length
            payload += got
        assert payload == extent.data
        assert frame.pieces[0].start == frame.start


@pytest.mark.parametrize("compressed", [False, 2])
def test_file_source_returns_the_planned_bytes(tmp_path: Path, compressed: Compression) -> None:
    data = bytes(range(256)) * 40 + b"text " * 3000  # 25,240 bytes
    extents = [
        Extent(Kind.ZERO, 0, 1000),
        Extent(Kind.DATA, 1000, len(data), data, (7, 5000)),
        Extent(Kind.DATA, 1000 + len(data), 3, b"end"),
    ]
    raw, _, _ = write_stream(extents, 40000, compressed, max_piece=4096)
    path = tmp_path / "vda.full.data"
    path.write_bytes(raw)
    index = StreamReader(io.BytesIO(raw), str(path)).index()
    later = [IndexedFrame(Kind.DATA, 3000, 10000, (Piece(3000, 10000, 0, 10000),))]
    plan = plan_chain([index, later])
    got = bytearray(40000)
    with ThreadPoolExecutor(2) as pool, FileSource(path, compressed is not False, pool) as src:
        for offset, chunk in src.chunks(plan.files[0]):
            got[offset : offset + len(chunk)] = chunk
    expected = bytearray(40000)
    expected[1000 : 1000 + len(data)] = data
    expected[1000 + len(data) : 1003 + len(data)] = b"end"
    expected[3000:13000] = bytes(10000)  # the later file's part is not taken from this one
    assert got == expected


def test_file_source_names_damaged_compressed_data(tmp_path: Path) -> None:
    extents = [Extent(Kind.DATA, 0, 9000, b"abc" * 3000)]
    raw, _, _ = write_stream(extents, 9000, 2, max_piece=4096)
    index = StreamReader(io.BytesIO(raw), "x").index()
    piece = index[0].pieces[1]
    damaged = bytearray(raw)
    damaged[piece.position + piece.stored // 2] ^= 0xFF
    path = tmp_path / "vda.full.data"
    path.write_bytes(damaged)
    plan = plan_chain([index])
    with ThreadPoolExecutor(2) as pool, FileSource(path, True, pool) as src:  # noqa: SIM117
        with pytest.raises(StreamError, match=f"vda.full.data at offset {piece.position}"):
            for _ in src.chunks(plan.files[0]):
                pass
