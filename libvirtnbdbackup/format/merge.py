"""Merge a chain of data files (a full, then incrementals) into one full stream.

The merged extent map (``chainimage.merge_layers``) says which file holds
the newest bytes of every range of the disk. Every source file is then read
once, front to back, by its own cursor: the bytes that survive go to the
new file, the others are only summed, so each file's Adler-32 is checked
against its ``.chksum`` without a second read. Compressed extents that
survive whole are copied as they are stored (LZ4 frames and trailer entry
unchanged); only extents cut by newer data are decompressed, and the
surviving part compressed again.

A source whose checksum does not match, or whose frames do not parse,
raises :class:`StreamError` before the new file is used: the caller
discards it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import lz4.frame

from ..errors import StreamError
from .chainimage import ChainImage, Segment, merge_layers
from .checksum import adler32
from .index import Extent, FileIndex, build_index, open_index
from .meta import StreamMeta
from .reader import read_meta
from .writer import StreamWriter

CHUNK = 4 * 1024 * 1024
SAMPLE_SPAN = 64 * 1024
SAMPLE_SEGMENTS = 64
SAMPLE_RANDOM = 32


@dataclass(frozen=True)
class MergeResult:
    meta: StreamMeta
    adler32: int
    index: FileIndex
    segments: list[Segment]
    copied_whole: int  # bytes of extents copied as stored
    bytes_read: int  # bytes read from the source files (all of each)


class _Cursor:
    """Reads one source file strictly front to back, summing every byte."""

    def __init__(self, path: str, index: FileIndex, checksum: int) -> None:
        self.path = path
        self.index = index
        self.checksum = checksum
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        if self.size != index.file_size:
            os.close(self._fd)
            raise StreamError(f"{path}: {self.size} bytes, its index says {index.file_size}")
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self.pos = 0
        self.adler = 1
        # The decompressed piece last read: (payload offset, piece number, bytes).
        self.piece: tuple[int, int, bytes] | None = None

    def close(self) -> None:
        os.close(self._fd)

    def read(self, n: int) -> memoryview:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = os.preadv(self._fd, [view[got:]], self.pos + got)
            if k <= 0:
                raise StreamError(
                    f"{self.path}: file ends at offset {self.pos + got}, inside a frame "
                    "(the file is truncated)"
                )
            got += k
        self.adler = adler32(view, self.adler)
        self.pos += n
        return view

    def chunks(self, n: int) -> Iterator[memoryview]:
        while n:
            take = min(n, CHUNK)
            yield self.read(take)
            n -= take

    def skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise StreamError(f"{self.path}: merge read back to offset {offset} (a bug)")
        for _ in self.chunks(offset - self.pos):
            pass

    def finish(self) -> None:
        """Sum the rest of the file and compare with its ``.chksum``."""
        self.skip_to(self.size)
        if self.adler != self.checksum:
            raise StreamError(
                f"{self.path}: Adler-32 {self.adler} does not match its checksum file "
                f"({self.checksum}): the file is damaged; nothing was merged"
            )

    def packed_piece(self, extent: Extent, number: int) -> bytes:
        """Piece ``number`` of a compressed extent, decompressed and checked."""
        if self.piece is not None and self.piece[:2] == (extent.offset, number):
            return self.piece[2]
        position = extent.offset + sum(p for p, _u in extent.pieces[:number])
        packed, unpacked = extent.pieces[number]
        self.skip_to(position)
        raw = self.read(packed)
        try:
            piece = bytes(lz4.frame.decompress(raw))
        except RuntimeError as err:
            raise StreamError(
                f"{self.path} at offset {position}: compressed data is damaged: {err}"
            ) from None
        if len(piece) != unpacked:
            raise StreamError(
                f"{self.path} at offset {position}: piece decompresses to {len(piece)} "
                f"bytes, the index says {unpacked}"
            )
        self.piece = (extent.offset, number, piece)
        return piece


def read_checksum(path: str) -> int:
    try:
        with open(path + ".chksum") as fh:
            return int(fh.read().strip())
    except FileNotFoundError:
        raise StreamError(
            f"{path} has no checksum file ({os.path.basename(path)}.chksum): its bytes cannot "
            "be checked, so it is not merged"
        ) from None
    except (OSError, ValueError) as err:
        raise StreamError(f"{path}.chksum is damaged ({err}); the file is not merged") from None


def merged_meta(metas: list[StreamMeta], data_size: int) -> StreamMeta:
    """The meta of a full backup taken at the last file's checkpoint and time."""
    base, last = metas[0], metas[-1]
    return StreamMeta(
        virtual_size=base.virtual_size,
        data_size=data_size,
        disk_name=base.disk_name,
        disk_format=base.disk_format,
        checkpoint_name=last.checkpoint_name,
        parent_checkpoint="",
        incremental=False,
        compressed=base.compressed,
        date=last.date,
    )


def open_chain(paths: list[str]) -> tuple[list[StreamMeta], list[FileIndex]]:
    metas = [read_meta(p) for p in paths]
    indexes = []
    for path in paths:
        with open(path, "rb") as fh:
            indexes.append(open_index(path, fh))
    size = metas[0].virtual_size
    for path, meta in zip(paths, metas, strict=True):
        if meta.virtual_size != size:
            raise StreamError(
                f"{path}: disk size {meta.virtual_size} differs from the full backup's {size} "
                "(the disk was resized): this chain cannot be merged"
            )
    return metas, indexes


def merge_chain(paths: list[str], out: BinaryIO, out_name: str) -> MergeResult:
    """Write the full stream that ``paths`` (full first) restore to into ``out``."""
    metas, indexes = open_chain(paths)
    size = metas[0].virtual_size
    segments = merge_layers(indexes, size)
    data_size = sum(s.end - s.start for s in segments if s.extent is not None)
    meta = merged_meta(metas, data_size)
    cursors: list[_Cursor] = []
    try:
        for path, index in zip(paths, indexes, strict=True):
            cursors.append(_Cursor(path, index, read_checksum(path)))
        writer = StreamWriter(out, meta)
        copied = _write_segments(writer, segments, cursors)
        for cursor in cursors:
            cursor.finish()
        checksum = writer.finish()
        read = sum(c.size for c in cursors)
    finally:
        for cursor in cursors:
            cursor.close()
    return MergeResult(meta, checksum, writer.index(out_name), segments, copied, read)


def _write_segments(writer: StreamWriter, segments: list[Segment], cursors: list[_Cursor]) -> int:
    copied = 0
    i = 0
    while i < len(segments):
        seg = segments[i]
        if seg.extent is None:
            writer.zero(seg.start, seg.end - seg.start)
            i += 1
            continue
        cursor = cursors[seg.layer]
        whole = seg.start == seg.extent.start and seg.end == seg.extent.start + seg.extent.length
        if writer.compressed and whole and seg.extent.pieces:
            cursor.skip_to(seg.extent.offset)
            stored = sum(p for p, _u in seg.extent.pieces)
            writer.copied(seg.start, seg.end - seg.start, seg.extent.pieces, cursor.chunks(stored))
            copied += seg.end - seg.start
            i += 1
            continue
        # A run of adjacent data segments: one frame when uncompressed (cheap
        # to join); compressed, one frame per segment so whole ones copy.
        run = [seg]
        if not writer.compressed:
            while (
                i + len(run) < len(segments)
                and segments[i + len(run)].extent is not None
                and segments[i + len(run)].start == run[-1].end
            ):
                run.append(segments[i + len(run)])
        length = run[-1].end - run[0].start
        writer.data(run[0].start, length, _run_bytes(run, cursors))
        i += len(run)
    return copied


def _run_bytes(run: list[Segment], cursors: list[_Cursor]) -> Iterator[memoryview]:
    for seg in run:
        yield from segment_bytes(seg, cursors[seg.layer])


def segment_bytes(seg: Segment, cursor: _Cursor) -> Iterator[memoryview]:
    """The bytes of one data segment, read from its layer's cursor."""
    extent = seg.extent
    assert extent is not None
    skip = seg.start - extent.start
    length = seg.end - seg.start
    if not extent.pieces:
        cursor.skip_to(extent.offset + skip)
        yield from cursor.chunks(length)
        return
    base = 0
    for number, (_packed, unpacked) in enumerate(extent.pieces):
        if base + unpacked > skip and base < skip + length:
            piece = memoryview(cursor.packed_piece(extent, number))
            first = max(skip - base, 0)
            last = min(skip + length - base, unpacked)
            for pos in range(first, last, CHUNK):
                yield piece[pos : min(pos + CHUNK, last)]
        base += unpacked


def _coalesced(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for start, end, data in runs:
        if out and out[-1][2] == data and out[-1][1] == start:
            out[-1] = (out[-1][0], end, data)
        else:
            out.append((start, end, data))
    return out


def extent_map(segments: list[Segment]) -> list[tuple[int, int, bool]]:
    """(start, end, holds data) runs of a merged map, neighbours of one kind joined."""
    return _coalesced([(s.start, s.end, s.extent is not None) for s in segments])


def verify_merged(paths: list[str], merged: str, segments: list[Segment], *, full: bool) -> int:
    """Check the new file against the chain it replaces; the bytes compared.

    The new file's frames are walked again from disk (not trusted from the
    writer) and must tile the disk as the chain's merged map does; then the
    bytes of a sample (the ends of up to 64 data runs and 32 random
    windows), or with ``full`` every data byte, are compared.
    """
    with open(merged, "rb") as fh:
        index = build_index(fh, merged)
    size = index.virtual_size
    new_map = extent_map(merge_layers([index], size))
    if new_map != extent_map(segments):
        raise StreamError(f"{merged}: its extent map differs from the chain it replaces")
    old = ChainImage(paths)
    new = ChainImage([merged], indexes=[index])
    try:
        windows = _windows(new_map, size, full)
        compared = 0
        for start, length in windows:
            if old.read(start, length) != new.read(start, length):
                raise StreamError(
                    f"{merged}: bytes at offset {start}+{length} differ from the chain it replaces"
                )
            compared += length
        return compared
    finally:
        old.close()
        new.close()


def _windows(runs: list[tuple[int, int, bool]], size: int, full: bool) -> list[tuple[int, int]]:
    data = [(s, e) for s, e, d in runs if d]
    if full:
        return [(pos, min(CHUNK, e - pos)) for s, e in data for pos in range(s, e, CHUNK)]
    rng = random.Random(size ^ len(data))
    chosen = data if len(data) <= SAMPLE_SEGMENTS else rng.sample(data, SAMPLE_SEGMENTS)
    windows = set()
    for s, e in chosen:
        windows.add((s, min(SAMPLE_SPAN, e - s)))
        windows.add((max(s, e - SAMPLE_SPAN), min(SAMPLE_SPAN, e - s)))
    for _ in range(SAMPLE_RANDOM if size > SAMPLE_SPAN else 0):
        pos = rng.randrange(0, size - SAMPLE_SPAN)
        windows.add((pos, SAMPLE_SPAN))
    return sorted(windows)
