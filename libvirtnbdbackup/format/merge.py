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
from .frames import MAX_REQUEST_SIZE
from .index import Extent, FileIndex, build_index, open_index
from .meta import StreamMeta
from .reader import read_meta
from .writer import Buffer, StreamWriter

CHUNK = 4 * 1024 * 1024
SKIP_CHUNK = 1024 * 1024  # reads only summed, and compressed bytes being unpacked
SAMPLE_SPAN = 64 * 1024
SAMPLE_SEGMENTS = 32
SAMPLE_RANDOM = 16
# Decompressed pieces the check keeps per chain (the windows are in offset order).
CHECK_CACHE = 0


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
        self._buffer = memoryview(bytearray(0))
        # The decompressed piece last read: (payload offset, piece number, bytes).
        self.piece: tuple[int, int, bytearray] | None = None

    def close(self) -> None:
        os.close(self._fd)

    def read(self, n: int) -> memoryview:
        """The next ``n`` bytes; up to ``CHUNK`` of them in a buffer that the
        next read reuses (every consumer writes or copies them at once)."""
        if n > len(self._buffer):  # grown to the largest read asked for (at most CHUNK)
            self._buffer = memoryview(bytearray(n))
        view = self._buffer[:n]
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

    def chunks(self, n: int, size: int = CHUNK) -> Iterator[memoryview]:
        while n:
            take = min(n, size)
            yield self.read(take)
            n -= take

    def skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise StreamError(f"{self.path}: merge read back to offset {offset} (a bug)")
        for _ in self.chunks(offset - self.pos, SKIP_CHUNK):
            pass

    def finish(self) -> None:
        """Sum the rest of the file and compare with its ``.chksum``."""
        self.skip_to(self.size)
        if self.adler != self.checksum:
            raise StreamError(
                f"{self.path}: Adler-32 {self.adler} does not match its checksum file "
                f"({self.checksum}): the file is damaged; nothing was merged"
            )

    def piece_position(self, extent: Extent, number: int) -> int:
        return extent.offset + sum(p for p, _u in extent.pieces[:number])

    def stored_piece(self, extent: Extent, number: int) -> Iterator[memoryview]:
        """Piece ``number`` of a compressed extent as stored (its LZ4 frame)."""
        self.skip_to(self.piece_position(extent, number))
        yield from self.chunks(extent.pieces[number][0])

    def packed_piece(self, extent: Extent, number: int) -> bytearray:
        """Piece ``number`` of a compressed extent, decompressed and checked."""
        if self.piece is not None and self.piece[:2] == (extent.offset, number):
            return self.piece[2]
        position = self.piece_position(extent, number)
        packed, unpacked = extent.pieces[number]
        self.piece = None  # let the last piece go before the next is made
        self.skip_to(position)
        # Fed as it is read, into one buffer of the piece's size: a one-shot
        # decompress would hold the packed bytes and two copies of the piece.
        piece = bytearray(unpacked)
        got = 0
        unpacker = lz4.frame.LZ4FrameDecompressor()
        try:
            for chunk in self.chunks(packed, SKIP_CHUNK):
                # Bounded output per call: unbounded, lz4 allocates for the
                # whole content size the frame announces, each call.
                data: Buffer = chunk
                while True:
                    part = unpacker.decompress(data, max_length=SKIP_CHUNK)
                    data = b""
                    if got + len(part) > unpacked:
                        raise RuntimeError("more bytes than the index says")
                    piece[got : got + len(part)] = part
                    got += len(part)
                    if unpacker.needs_input or unpacker.eof:
                        break
            complete = unpacker.eof and not unpacker.unused_data
        except RuntimeError as err:
            raise StreamError(
                f"{self.path} at offset {position}: compressed data is damaged: {err}"
            ) from None
        if got != unpacked or not complete:
            raise StreamError(
                f"{self.path} at offset {position}: piece decompresses to {got} bytes"
                f"{'' if complete else ' and ends early'}, the index says {unpacked}"
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


def merged_meta(metas: list[StreamMeta], data_size: int, parent: str | None) -> StreamMeta:
    """The meta of a backup taken at the last file's checkpoint and time: a
    full (``parent`` None), or an incremental on checkpoint ``parent``."""
    base, last = metas[0], metas[-1]
    return StreamMeta(
        virtual_size=base.virtual_size,
        data_size=data_size,
        disk_name=base.disk_name,
        disk_format=base.disk_format,
        checkpoint_name=last.checkpoint_name,
        parent_checkpoint=parent or "",
        incremental=parent is not None,
        compressed=base.compressed,
        date=last.date,
    )


def coverage(indexes: list[FileIndex]) -> list[tuple[int, int]]:
    """The ranges some file of ``indexes`` has a frame for (data or zero), joined."""
    spans = sorted((e.start, e.start + e.length) for idx in indexes for e in idx.extents)
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _covered_only(segments: list[Segment], covered: list[tuple[int, int]]) -> list[Segment]:
    """The segments cut to the covered ranges (an incremental keeps its gaps)."""
    out = []
    i = 0
    for seg in segments:
        while i < len(covered) and covered[i][1] <= seg.start:
            i += 1
        j = i
        while j < len(covered) and covered[j][0] < seg.end:
            lo, hi = max(seg.start, covered[j][0]), min(seg.end, covered[j][1])
            if lo < hi:
                out.append(Segment(lo, hi, seg.layer, seg.extent))
            j += 1
    return out


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


def merge_chain(
    paths: list[str],
    out: BinaryIO,
    out_name: str,
    *,
    parent: str | None = None,
    max_piece: int = MAX_REQUEST_SIZE,
    checksums: list[int] | None = None,
) -> MergeResult:
    """Write the one file that replaces ``paths`` (oldest first) into ``out``.

    Without ``parent`` the files are a full and its incrementals, and the
    result is a full stream tiling the disk. With ``parent`` they are
    consecutive incrementals, and the result is one incremental on that
    checkpoint: what any of them saved, newest first; ranges none saved
    stay gaps. ``max_piece``: the piece size of compressed frames, the
    chain's (the largest NBD request, as the backups were cut).
    ``checksums``: the Adler-32 each file must have (the checked reader's,
    from ``.chksum`` and manifest); by default its ``.chksum`` file's.
    """
    metas, indexes = open_chain(paths)
    if parent is None and metas[0].incremental:
        raise StreamError(f"{paths[0]}: a merge into a full must start with a full backup")
    size = metas[0].virtual_size
    segments = merge_layers(indexes, size)
    if parent is not None:
        segments = _covered_only(segments, coverage(indexes))
    data_size = sum(s.end - s.start for s in segments if s.extent is not None)
    meta = merged_meta(metas, data_size, parent)
    cursors: list[_Cursor] = []
    try:
        sums = checksums if checksums is not None else [read_checksum(p) for p in paths]
        for path, index, checksum in zip(paths, indexes, sums, strict=True):
            cursors.append(_Cursor(path, index, checksum))
        writer = StreamWriter(out, meta, max_piece=max_piece)
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
    """Write every segment; the bytes copied as stored (not decompressed)."""
    copied = 0
    i = 0
    while i < len(segments):
        seg = segments[i]
        if seg.extent is None:
            writer.zero(seg.start, seg.end - seg.start)
            i += 1
            continue
        if writer.compressed:
            if seg.extent.pieces:
                plan = _piece_plan(seg, writer.max_piece)
                cursor = cursors[seg.layer]
                writer.assembled(seg.start, seg.end - seg.start, _pieces(seg, plan, cursor))
                copied += sum(u for number, u, whole in plan if whole)
            else:  # an uncompressed file in a compressed chain
                writer.data(seg.start, seg.end - seg.start, segment_bytes(seg, cursors[seg.layer]))
            i += 1
            continue
        # Uncompressed: a run of adjacent data segments is one frame.
        run = [seg]
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


def _piece_plan(seg: Segment, max_piece: int) -> list[tuple[int, int, bool]]:
    """How a segment of a compressed extent is written: (source piece, bytes
    of it kept, whether it is kept whole and so copied as stored).

    A frame below ``max_piece`` must be one LZ4 frame: unless it is one
    whole source piece, it is compressed again as one (number -1).
    """
    extent = seg.extent
    assert extent is not None
    skip, end = seg.start - extent.start, seg.end - extent.start
    plan = []
    base = 0
    for number, (_packed, unpacked) in enumerate(extent.pieces):
        lo, hi = max(skip, base), min(end, base + unpacked)
        if lo < hi:
            plan.append((number, hi - lo, lo == base and hi == base + unpacked))
        base += unpacked
    if seg.end - seg.start < max_piece and not (len(plan) == 1 and plan[0][2]):
        return [(-1, seg.end - seg.start, False)]
    return plan


def _pieces(
    seg: Segment, plan: list[tuple[int, int, bool]], cursor: _Cursor
) -> Iterator[tuple[int, int | None, Iterator[memoryview]]]:
    extent = seg.extent
    assert extent is not None
    if plan[0][0] < 0:
        yield plan[0][1], None, segment_bytes(seg, cursor)
        return
    base = {n: sum(u for _p, u in extent.pieces[:n]) for n, _k, _w in plan}
    for number, kept, whole in plan:
        if whole:
            yield kept, extent.pieces[number][0], cursor.stored_piece(extent, number)
        else:
            lo = max(seg.start, extent.start + base[number])
            part = Segment(lo, lo + kept, seg.layer, extent)
            yield kept, None, segment_bytes(part, cursor)


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
                end = min(pos + CHUNK, last)
                # The last slice as a copy: the consumer still holds it when the
                # next piece is made, and a view would keep this one alive too.
                yield piece[pos:end] if end < last else memoryview(bytes(piece[pos:end]))
            del piece  # before the next piece is made: only one is ever held
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
    bytes of a sample (the ends of up to 32 data runs and 16 random
    windows), or with ``full`` every data byte, are compared.
    """
    with open(merged, "rb") as fh:
        index = build_index(fh, merged)
    size = index.virtual_size
    new_map = extent_map(merge_layers([index], size))
    old_map = extent_map(_tiled(segments, size))
    if new_map != old_map:
        raise StreamError(f"{merged}: its extent map differs from the chain it replaces")
    if read_meta(merged).incremental:
        _metas, olds = open_chain(paths)
        if coverage([index]) != coverage(olds):
            raise StreamError(
                f"{merged}: the ranges it saves differ from those of the files it replaces"
            )
    old = ChainImage(paths, cache_bytes=CHECK_CACHE)
    new = ChainImage([merged], cache_bytes=CHECK_CACHE, indexes=[index])
    try:
        windows = _windows(new_map, size, full, index.compressed)
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


def _tiled(segments: list[Segment], size: int) -> list[Segment]:
    """Segments with the gaps between them filled as zero (for comparing maps)."""
    out = []
    pos = 0
    for seg in segments:
        if seg.start > pos:
            out.append(Segment(pos, seg.start, -1, None))
        out.append(seg)
        pos = seg.end
    if pos < size:
        out.append(Segment(pos, size, -1, None))
    return out


def _windows(
    runs: list[tuple[int, int, bool]], size: int, full: bool, compressed: bool = False
) -> list[tuple[int, int]]:
    data = [(s, e) for s, e, d in runs if d]
    if full:
        return [(pos, min(CHUNK, e - pos)) for s, e in data for pos in range(s, e, CHUNK)]
    rng = random.Random(size ^ len(data))
    # Compressed, each window costs the decompression of a piece on both
    # sides: half as many, the run ends (where merges cut) before the rest.
    segments = SAMPLE_SEGMENTS // 2 if compressed else SAMPLE_SEGMENTS
    chosen = data if len(data) <= segments else rng.sample(data, segments)
    windows = set()
    for s, e in chosen:
        windows.add((s, min(SAMPLE_SPAN, e - s)))
        windows.add((max(s, e - SAMPLE_SPAN), min(SAMPLE_SPAN, e - s)))
    for _ in range(
        (SAMPLE_RANDOM // 4 if compressed else SAMPLE_RANDOM) if size > SAMPLE_SPAN else 0
    ):
        pos = rng.randrange(0, size - SAMPLE_SPAN)
        windows.add((pos, SAMPLE_SPAN))
    return sorted(windows)
