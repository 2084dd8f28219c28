"""Extent index side files and the merged chain view that virtnbdmap serves.

Every chain is checked against a model: apply the files oldest first to a
zeroed bytearray, the way a restore does (zero frames write zeroes).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format import chainimage
from libvirtnbdbackup.format.chainimage import ChainImage, PieceCache
from libvirtnbdbackup.format.index import (
    FileIndex,
    build_index,
    index_path,
    load_index,
    open_index,
)
from libvirtnbdbackup.format.writer import StreamWriter
from libvirtnbdbackup.format.zeros import zeros_of_index, zeros_path

from .samples import sample_meta

BLOCK = 4096
BLOCKS = 64
SIZE = BLOCK * BLOCKS
# (first block, block count, fill byte or None for a zero frame)
Frame = tuple[int, int, int | None]


def write_file(
    path: Path,
    frames: list[Frame],
    *,
    incremental: bool,
    compressed: bool | int = False,
    max_piece: int = 3 * BLOCK,
) -> StreamWriter:
    data_size = sum(n * BLOCK for _s, n, fill in frames if fill is not None)
    meta = sample_meta(
        virtual_size=SIZE,
        data_size=data_size,
        checkpoint_name=f"virtnbdbackup.{int(incremental)}",
        parent_checkpoint="virtnbdbackup.0" if incremental else "",
        incremental=incremental,
        compressed=compressed,
    )
    with open(path, "wb") as fh:
        writer = StreamWriter(fh, meta, max_piece=max_piece)
        for start, count, fill in frames:
            if fill is None:
                writer.zero(start * BLOCK, count * BLOCK)
            else:
                payload = pattern(fill, count)
                half = len(payload) // 2  # chunks that do not line up with pieces
                writer.data(start * BLOCK, count * BLOCK, [payload[:half], payload[half:]])
        writer.finish()
    if incremental:  # as the backup does: zero ranges in the side file, not in frames
        Path(zeros_path(str(path))).write_bytes(zeros_of_index(writer.index(path.name)))
    return writer


def apply(model: bytearray, frames: list[Frame]) -> None:
    for start, count, fill in frames:
        if fill is None:
            model[start * BLOCK : (start + count) * BLOCK] = bytes(count * BLOCK)
        else:
            model[start * BLOCK : (start + count) * BLOCK] = pattern(fill, count)


def pattern(fill: int, blocks: int) -> bytes:
    return bytes((fill + i) % 256 for i in range(256)) * (blocks * BLOCK // 256)


@st.composite
def layouts(draw: st.DrawFn, full: bool) -> list[Frame]:
    """Sorted, disjoint frames; a full backup covers the whole disk."""
    cuts = sorted(draw(st.sets(st.integers(1, BLOCKS - 1), max_size=10)))
    bounds = [0, *cuts, BLOCKS]
    frames: list[Frame] = []
    for a, b in itertools.pairwise(bounds):
        kind = draw(st.sampled_from(["data", "zero"] if full else ["data", "zero", "gap"]))
        if kind == "gap":
            continue
        fill = draw(st.integers(1, 255)) if kind == "data" else None
        frames.append((a, b - a, fill))
    return frames


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=layouts(full=True),
    incs=st.lists(layouts(full=False), max_size=3),
    compressed=st.lists(st.booleans(), min_size=4, max_size=4),
    reads=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, SIZE)), max_size=8),
)
def test_chain_reads_equal_a_restore(
    tmp_path_factory: pytest.TempPathFactory,
    base: list[Frame],
    incs: list[list[Frame]],
    compressed: list[bool],
    reads: list[tuple[int, int]],
) -> None:
    folder = tmp_path_factory.mktemp("chain")
    model = bytearray(SIZE)
    paths = []
    for n, frames in enumerate([base, *incs]):
        path = folder / f"{n}.data"
        write_file(path, frames, incremental=n > 0, compressed=2 if compressed[n] else False)
        apply(model, frames)
        paths.append(str(path))
    image = ChainImage(paths, cache_bytes=5 * BLOCK)
    try:
        assert image.read(0, SIZE) == bytes(model)
        for offset, length in reads:
            length = min(length, SIZE - offset)
            assert image.read(offset, length) == bytes(model[offset : offset + length])
        runs = image.extents(0, SIZE)
        assert sum(n for _o, n, _z in runs) == SIZE
        for offset, _length in reads:  # a bounded reply is the start of the full one
            whole = image.extents(offset, SIZE - offset)
            assert image.extents(offset, SIZE - offset, limit=2) == whole[:2]
        for offset, length, zero in runs:
            if zero:
                assert model[offset : offset + length] == bytes(length)
    finally:
        image.close()


@pytest.mark.parametrize("compressed", [False, 2])
def test_writer_index_equals_the_index_built_from_headers(tmp_path: Path, compressed: int) -> None:
    frames: list[Frame] = [(0, 2, 7), (2, 5, None), (7, 10, 9), (17, 47, 3)]
    path = tmp_path / "vda.full.data"
    writer = write_file(path, frames, incremental=False, compressed=compressed)
    written = writer.index(path.name)
    with open(path, "rb") as fh:
        built = build_index(fh, str(path))
    assert written == built
    if compressed:  # 10 and 47 blocks at 3 blocks a piece: several pieces each
        assert [len(e.pieces) for e in built.extents if not e.is_zero] == [1, 4, 16]
    assert FileIndex.from_bytes(built.to_bytes(), "x") == built


def test_side_file_is_written_reused_and_rebuilt_when_stale(tmp_path: Path) -> None:
    path = tmp_path / "vda.full.data"
    write_file(path, [(0, 64, 5)], incremental=False)
    side = Path(index_path(str(path)))
    with open(path, "rb") as fh:
        assert load_index(str(path), fh) is None
        first = open_index(str(path), fh)
    assert side.is_file()
    with open(path, "rb") as fh:
        assert load_index(str(path), fh) == first
    # Another backup under the same name: same size, other meta (date) -> stale.
    os.utime(side, (0, 0))
    write_file(path, [(0, 32, 6), (32, 32, None)], incremental=False)
    with open(path, "rb") as fh:
        assert load_index(str(path), fh) is None
        again = open_index(str(path), fh)
    assert again.extents != first.extents
    side.write_text("{not json")
    with open(path, "rb") as fh:
        assert load_index(str(path), fh) is None


def test_opening_a_chain_with_an_index_reads_no_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a fresh side file, opening reads the index and the file's two 64 KiB ends."""
    path = tmp_path / "vda.full.data"
    write_file(path, [(0, 64, 1)], incremental=False)
    with open(path, "rb") as fh:
        open_index(str(path), fh)
    # Change payload bytes between the fingerprinted ends: the index still
    # matches, and reads must come from the payload offsets it records.
    with open(path, "r+b") as fh:
        fh.seek(SIZE // 2)
        fh.write(b"\xee" * BLOCK)

    def no_build(*_args: object) -> None:
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr("libvirtnbdbackup.format.index.build_index", no_build)
    reads: list[int] = []
    real_preadv = os.preadv
    monkeypatch.setattr(
        "libvirtnbdbackup.format.chainimage.os.preadv",
        lambda fd, bufs, pos: reads.append(pos) or real_preadv(fd, bufs, pos),
    )
    image = ChainImage([str(path)])
    try:
        assert reads == []
        got = image.read(0, SIZE)
        assert got.count(b"\xee" * BLOCK) >= 1
        assert reads
    finally:
        image.close()


def test_damaged_compressed_piece_is_reported_on_read(tmp_path: Path) -> None:
    path = tmp_path / "vda.full.data"
    write_file(path, [(0, 64, 1)], incremental=False, compressed=2, max_piece=64 * BLOCK)
    with open(path, "rb") as fh:
        index = open_index(str(path), fh)
    extent = index.extents[0]
    with open(path, "r+b") as fh:
        fh.seek(extent.offset + extent.pieces[0][0] // 2)
        fh.write(b"\xff\xfe\xfd\xfc")
    image = ChainImage([str(path)])
    try:
        with pytest.raises(StreamError, match="damaged"):
            image.read(0, BLOCK)
    finally:
        image.close()


def test_chain_of_different_disk_sizes_is_refused(tmp_path: Path) -> None:
    a = tmp_path / "a.data"
    write_file(a, [(0, 64, 1)], incremental=False)
    b = tmp_path / "b.data"
    meta = sample_meta(
        virtual_size=SIZE * 2,
        checkpoint_name="virtnbdbackup.1",
        parent_checkpoint="virtnbdbackup.0",
        incremental=True,
    )
    with open(b, "wb") as fh:
        StreamWriter(fh, meta).finish()
    with pytest.raises(StreamError, match="disk size"):
        ChainImage([str(a), str(b)])


def test_piece_cache_stays_within_its_limit() -> None:
    cache = PieceCache(limit=10)
    for n in range(5):
        cache.put((0, n), bytes(4))
    assert cache.get((0, 4)) is not None
    assert cache.get((0, 0)) is None
    assert sum(len(cache.get((0, n)) or b"") for n in range(5)) <= 10


def test_a_piece_wanted_by_many_threads_is_decompressed_once() -> None:
    cache = PieceCache(limit=1 << 20)
    calls: list[int] = []
    gate = threading.Event()

    def load() -> bytes:
        calls.append(1)
        gate.wait(5)
        return b"piece"

    with ThreadPoolExecutor(8) as pool:
        results = [pool.submit(cache.get_or_load, (0, 0), load) for _ in range(8)]
        time.sleep(0.1)
        gate.set()
        assert [r.result(5) for r in results] == [b"piece"] * 8
    assert len(calls) == 1


def test_a_failed_load_is_reported_to_every_waiter() -> None:
    cache = PieceCache(limit=1 << 20)

    def load() -> bytes:
        time.sleep(0.05)
        raise StreamError("damaged")

    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(cache.get_or_load, (0, 0), load) for _ in range(4)]
        for r in results:
            with pytest.raises(StreamError):
                r.result(5)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(reads=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, SIZE)), max_size=10))
def test_reads_across_the_slices_of_a_piece(
    tmp_path_factory: pytest.TempPathFactory, reads: list[tuple[int, int]]
) -> None:
    # Small slices: every piece is held in many, of the uneven sizes lz4 makes.
    folder = tmp_path_factory.mktemp("slices")
    path = folder / "vda.full.data"
    frames: list[Frame] = [(0, 20, 7), (20, 4, None), (24, 40, 9)]
    write_file(path, frames, incremental=False, compressed=2, max_piece=32 * BLOCK)
    model = bytearray(SIZE)
    apply(model, frames)
    image = ChainImage([str(path)], cache_bytes=3 * BLOCK)
    saved = chainimage.SLICE
    chainimage.SLICE = 1500
    try:
        for offset, length in reads:
            length = min(length, SIZE - offset)
            assert image.read(offset, length) == bytes(model[offset : offset + length])
    finally:
        chainimage.SLICE = saved
        image.close()


def _one_extent_file(path: Path, size: int, *, compressed: bool) -> tuple[bytes, FileIndex]:
    """One data frame of random bytes (LZ4 stores them as literals; pieces
    of 256 KiB), from chunks that do not line up with the pieces or summed
    units, and its index side file as a backup writes it."""
    data = random.Random(3).randbytes(size)
    meta = sample_meta(virtual_size=size, data_size=size, compressed=2 if compressed else False)
    with open(path, "wb") as fh:
        writer = StreamWriter(fh, meta, max_piece=256 * 1024)
        writer.data(0, size, [data[:777_777], data[777_777:5_000_000], data[5_000_000:]])
        writer.finish()
    index = writer.index(path.name)
    Path(index_path(str(path))).write_bytes(index.to_bytes())
    return data, index


def test_the_writer_sums_each_stored_piece(tmp_path: Path) -> None:
    path = tmp_path / "vda.full.data"
    _data, index = _one_extent_file(path, 1024 * 1024, compressed=True)
    raw = path.read_bytes()
    extent = index.extents[0]
    assert len(extent.sums) == len(extent.pieces) == 4
    position = extent.offset
    for (packed, _unpacked), summed in zip(extent.pieces, extent.sums, strict=True):
        assert summed == zlib.adler32(raw[position : position + packed])
        position += packed
    with open(path, "rb") as fh:
        assert load_index(str(path), fh) == index  # the side file keeps them
        assert load_index(str(path), fh).extents[0].sums == extent.sums  # type: ignore[union-attr]


def _flip_inside_second_piece(path: Path, index: FileIndex) -> None:
    """A literal byte of the second piece, away from the first and last
    64 KiB (the index's fingerprint), so the index stays bound."""
    extent = index.extents[0]
    at = extent.offset + extent.pieces[0][0] + extent.pieces[1][0] // 2
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(raw)


def test_a_piece_against_its_sum_in_the_index(tmp_path: Path) -> None:
    """With sums the frames' xxHash is not computed: the flipped literal
    would decompress to a wrong byte, the piece's Adler-32 refuses it."""
    path = tmp_path / "vda.full.data"
    data, index = _one_extent_file(path, 1024 * 1024, compressed=True)
    image = ChainImage([str(path)])
    try:
        assert image.read(0, len(data)) == data
    finally:
        image.close()
    _flip_inside_second_piece(path, index)
    image = ChainImage([str(path)])
    try:
        assert image.read(0, 4096) == data[:4096]  # the first piece is fine
        with pytest.raises(StreamError, match=r"checksum \d+, its index says \d+ .*damaged"):
            image.read(300 * 1024, 4096)
    finally:
        image.close()


def test_without_sums_the_frames_checksums_are_checked(tmp_path: Path) -> None:
    """An index of version 2 (or rebuilt from the headers) has no sums."""
    path = tmp_path / "vda.full.data"
    _data, index = _one_extent_file(path, 1024 * 1024, compressed=True)
    bare = dataclasses.replace(
        index,
        version=2,
        extents=[dataclasses.replace(e, sums=()) for e in index.extents],
    )
    Path(index_path(str(path))).write_bytes(bare.to_bytes())
    _flip_inside_second_piece(path, index)
    with open(path, "rb") as fh:
        loaded = load_index(str(path), fh)
    assert loaded is not None and loaded.version == 2 and not loaded.extents[0].sums
    image = ChainImage([str(path)])
    try:
        with pytest.raises(StreamError, match="compressed data is damaged"):
            image.read(300 * 1024, 4096)
    finally:
        image.close()


class _Sized(bytes):
    """A cache value with an identity of its own (bytes may be shared)."""


def test_a_piece_dropped_while_pinned_is_recycled_only_when_released() -> None:
    dropped: list[bytes] = []
    cache = PieceCache(limit=10, drop=dropped.append)  # type: ignore[arg-type]
    first = cache.get_or_load((0, 0), lambda: _Sized(b"x" * 8))  # type: ignore[arg-type,return-value]
    cache.get_or_load((0, 1), lambda: _Sized(b"y" * 8))  # type: ignore[arg-type,return-value]
    assert cache.get((0, 0)) is None  # out of the cache, but still being read
    assert dropped == []
    cache.release(first)  # type: ignore[arg-type]
    assert dropped == [first]


def test_waiters_hold_their_pins_until_they_release() -> None:
    dropped: list[bytes] = []
    cache = PieceCache(limit=10, drop=dropped.append)  # type: ignore[arg-type]
    gate = threading.Event()

    def load() -> bytes:
        gate.wait(5)
        return _Sized(b"p" * 8)

    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(cache.get_or_load, (0, 0), load) for _ in range(4)]  # type: ignore[arg-type]
        time.sleep(0.1)
        gate.set()
        pieces = [r.result(5) for r in results]
    assert all(p is pieces[0] for p in pieces)
    cache.put((0, 1), _Sized(b"q" * 8))  # type: ignore[arg-type]
    for piece in pieces[:3]:
        cache.release(piece)  # type: ignore[arg-type]
        assert dropped == []
    cache.release(pieces[3])  # type: ignore[arg-type]
    assert dropped == [pieces[0]]


def test_threads_read_right_bytes_while_the_cache_recycles_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache of two pieces, slices of 1 KiB, 8 threads reading at random:
    every read gives the chain's bytes while buffers go round."""
    monkeypatch.setattr(chainimage, "SLICE", 1024)
    path = tmp_path / "vda.full.data"
    frames: list[Frame] = [(0, 30, 5), (30, 4, None), (34, 30, 11)]
    write_file(path, frames, incremental=False, compressed=2, max_piece=4 * BLOCK)
    model = bytearray(SIZE)
    apply(model, frames)
    recycled: list[int] = []
    recycle = chainimage.SlicePool.recycle

    def counted(pool: chainimage.SlicePool, piece: chainimage.Piece) -> None:
        recycled.append(len(piece.slices))
        recycle(pool, piece)

    monkeypatch.setattr(chainimage.SlicePool, "recycle", counted)
    image = ChainImage([str(path)], cache_bytes=8 * BLOCK)

    def reads(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            offset = rng.randrange(SIZE - 1)
            length = rng.randint(1, min(6 * BLOCK, SIZE - offset))
            assert image.read(offset, length) == bytes(model[offset : offset + length])

    try:
        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(reads, seed) for seed in range(8)]:
                future.result(60)
    finally:
        image.close()
    assert len(recycled) > 50  # the pool was used, not bypassed


def test_the_writer_sums_each_unit_of_an_uncompressed_payload(tmp_path: Path) -> None:
    path = tmp_path / "vda.full.data"
    data, index = _one_extent_file(path, 9 * 1024 * 1024, compressed=False)
    extent = index.extents[0]
    unit = 1024 * 1024
    assert extent.sums == tuple(
        zlib.adler32(data[at : at + unit]) for at in range(0, len(data), unit)
    )
    with open(path, "rb") as fh:
        assert load_index(str(path), fh).extents[0].sums == extent.sums  # type: ignore[union-attr]


def test_uncompressed_data_is_served_only_once_its_unit_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "vda.full.data"
    data, index = _one_extent_file(path, 9 * 1024 * 1024, compressed=False)
    extent = index.extents[0]
    raw = bytearray(path.read_bytes())
    raw[extent.offset + 5 * 1024 * 1024 + 700_000] ^= 0x01  # in the sixth unit
    path.write_bytes(raw)
    image = ChainImage([str(path)])
    try:
        assert image.read(0, 4096) == data[:4096]
        assert image.read(8 * 1024 * 1024, 4096) == data[8 * 1024 * 1024 : 8 * 1024 * 1024 + 4096]
        for _ in range(2):  # not only the first time
            with pytest.raises(StreamError, match=r"data have checksum \d+, its index says"):
                image.read(5 * 1024 * 1024 + 10, 100)  # away from the flipped byte, same unit
        # A read across the damaged unit fails too, whatever part it asks for first.
        with pytest.raises(StreamError, match="the data is damaged"):
            image.read(5 * 1024 * 1024 - 4096, 8192)
    finally:
        image.close()
