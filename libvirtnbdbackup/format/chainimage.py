"""A disk image read straight from a chain of data files, at random offsets.

The files are given oldest first (full or copy, then incrementals and a
differential in chain order). One merged extent map says, for every byte of
the disk, which file holds its newest version: ranges no file holds, and
``zero`` frames, read as zeroes (a zero frame of an incremental overrides
older data; in a full or copy it is a hole). Compressed extents are
decompressed one LZ4 piece at a time, with a bounded cache of pieces.

A piece is decompressed whole before any of its bytes is served (so it
has been checked: by the Adler-32 in the index, or the frame's xxHash),
but read and decompressed 1 MiB at a time and kept as 1 MiB slices: a
32 MiB buffer per piece cost a fresh mapping of zeroed pages each time. The
slices of pieces dropped from the cache are used again (``SlicePool``), once
no reader has the piece pinned. At most ``DECOMPRESSIONS`` pieces are
decompressed at once, so memory holds the cache and a few pieces more.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import StreamError
from .checksum import adler32
from .index import SUM_UNIT, Extent, FileIndex, open_index
from .lz4piece import SLICE, decompressed_slices

DEFAULT_CACHE = 256 * 1024 * 1024
DECOMPRESSIONS = max(2, min(4, os.cpu_count() or 2))
_ZEROES = bytes(1024 * 1024)


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    layer: int  # index of the file in the chain; -1 where the disk reads as zero
    extent: Extent | None  # the data extent holding the bytes; None for zeroes


def merge_layers(indexes: list[FileIndex], size: int) -> list[Segment]:
    """The newest extent at every offset of the disk, as contiguous segments.

    A sweep over the extent boundaries with a heap of the extents covering
    the current point, newest layer on top (each file's extents are sorted
    and disjoint, so at most one per layer is active).
    """
    per_layer = [[(e.start, layer, e) for e in idx.extents] for layer, idx in enumerate(indexes)]
    starts = heapq.merge(*per_layer, key=lambda item: item[0])
    ends = {e.start + e.length for idx in indexes for e in idx.extents}
    bounds = sorted({0, size} | {e.start for idx in indexes for e in idx.extents} | ends)
    pending = next(starts, None)
    active: list[tuple[int, int, int, Extent]] = []  # (-layer, end, tiebreak, extent)
    segments: list[Segment] = []
    for here, following in itertools.pairwise(bounds):
        while pending is not None and pending[0] == here:
            _start, layer, extent = pending
            heapq.heappush(active, (-layer, extent.start + extent.length, id(extent), extent))
            pending = next(starts, None)
        while active and active[0][1] <= here:
            heapq.heappop(active)
        if active and not active[0][3].is_zero:
            layer, extent = -active[0][0], active[0][3]
            segment = Segment(here, following, layer, extent)
        else:
            segment = Segment(here, following, -1, None)
        last = segments[-1] if segments else None
        if last is not None and last.extent is segment.extent and last.layer == segment.layer:
            segments[-1] = Segment(last.start, following, last.layer, last.extent)
        else:
            segments.append(segment)
    return segments


class Piece:
    """The bytes of one decompressed LZ4 piece, in slices as lz4 made them."""

    def __init__(self, slices: list[memoryview]) -> None:
        self.slices = slices
        self._starts = list(itertools.accumulate((len(s) for s in slices), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def copy_into(self, out: memoryview, first: int) -> None:
        """Fill ``out`` with the piece's bytes from offset ``first``."""
        index = bisect.bisect_right(self._starts, first) - 1
        skip = first - self._starts[index]
        done = 0
        while done < len(out):
            part = self.slices[index][skip : skip + len(out) - done]
            out[done : done + len(part)] = part
            done += len(part)
            index, skip = index + 1, 0


class SlicePool:
    """Slice buffers of pieces no longer used, for the next pieces.

    A fresh ``bytearray`` is zeroed (a tenth of a compressed chain's read
    time went into that, with the GIL held); a used one is overwritten as it
    is. Only full slices are kept, at most ``keep`` of them.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self, size: int) -> memoryview:
        if size == self.size:
            with self._lock:
                if self._free:
                    return memoryview(self._free.pop())
        return memoryview(bytearray(size))

    def put(self, view: memoryview) -> None:
        """Take back one buffer from ``get``."""
        with self._lock:
            self._keep(view.obj)

    def recycle(self, piece: Piece) -> None:
        """Take back the buffers of ``piece``; nobody may read it any more."""
        slices, piece.slices = piece.slices, []
        with self._lock:
            for view in slices:
                self._keep(view.obj)

    def _keep(self, buffer: object) -> None:
        """Keep ``buffer`` for ``get`` if it is a full slice and there is room
        (the lock held)."""
        if not isinstance(buffer, bytearray) or len(buffer) != self.size:
            return  # a piece's short last slice
        if len(self._free) < self.keep:
            self._free.append(buffer)


class _Loading:
    """A piece being decompressed by one thread while others wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.piece: Piece | None = None
        self.wanted = 0  # the loader and its waiters: the pins the piece starts with


class PieceCache:
    """Decompressed LZ4 pieces, least recently used dropped beyond ``limit`` bytes.

    Concurrent requests for a piece not yet cached decompress it once: the
    first one loads it, the others wait for its result. ``get_or_load``
    pins the piece it returns, ``release`` unpins it: a piece dropped from
    the cache goes to ``drop`` (its buffers to be used again) only once no
    reader has it pinned, so nobody reads a buffer that a new piece fills.
    """

    def __init__(self, limit: int, drop: Callable[[Piece], None] | None = None) -> None:
        self.limit = limit
        self._drop = drop
        self._pieces: OrderedDict[tuple[int, int], Piece] = OrderedDict()
        self._loading: dict[tuple[int, int], _Loading] = {}
        self._pins: dict[int, int] = {}  # id of a pinned piece: its pin count
        self._dropped: dict[int, Piece] = {}  # out of the cache, still pinned
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> Piece | None:
        """The cached piece, not pinned (to look at the cache)."""
        with self._lock:
            piece = self._pieces.get(key)
            if piece is not None:
                self._pieces.move_to_end(key)
            return piece

    def get_or_load(self, key: tuple[int, int], load: Callable[[], Piece]) -> Piece:
        """The piece, pinned: ``release`` it when done reading it."""
        with self._lock:
            piece = self._pieces.get(key)
            if piece is not None:
                self._pieces.move_to_end(key)
                self._pins[id(piece)] = self._pins.get(id(piece), 0) + 1
                return piece
            loading = self._loading.get(key)
            owner = loading is None
            if loading is None:
                loading = self._loading[key] = _Loading()
            loading.wanted += 1
        if not owner:
            loading.done.wait()
            if loading.piece is None:  # the loader failed: try (and report) it here
                return self.get_or_load(key, load)
            return loading.piece  # pinned for us by the loader
        try:
            piece = load()
        except BaseException:
            with self._lock:
                del self._loading[key]
            loading.done.set()
            raise
        with self._lock:
            # In one step: no one may come to wait on this load, unpinned, after.
            self._pins[id(piece)] = loading.wanted
            del self._loading[key]
            unused = self._insert(key, piece)
        loading.piece = piece
        loading.done.set()
        self._dispose(unused)
        return piece

    def release(self, piece: Piece) -> None:
        with self._lock:
            count = self._pins[id(piece)] - 1
            if count:
                self._pins[id(piece)] = count
                return
            del self._pins[id(piece)]
            unused = self._dropped.pop(id(piece), None)
        if unused is not None and self._drop is not None:
            self._drop(unused)

    def put(self, key: tuple[int, int], piece: Piece) -> None:
        with self._lock:
            unused = self._insert(key, piece)
        self._dispose(unused)

    def _insert(self, key: tuple[int, int], piece: Piece) -> list[Piece]:
        """Cache ``piece`` (the lock held), dropping the oldest; the pieces
        now out of the cache and unpinned."""
        unused: list[Piece] = []
        if key in self._pieces or len(piece) > self.limit:
            self._set_aside(piece, unused)
        else:
            self._pieces[key] = piece
            self._bytes += len(piece)
            while self._bytes > self.limit:
                _key, dropped = self._pieces.popitem(last=False)
                self._bytes -= len(dropped)
                self._set_aside(dropped, unused)
        return unused

    def _dispose(self, unused: list[Piece]) -> None:
        if self._drop is not None:
            for piece in unused:
                self._drop(piece)

    def _set_aside(self, piece: Piece, unused: list[Piece]) -> None:
        if id(piece) in self._pins:
            self._dropped[id(piece)] = piece
        else:
            unused.append(piece)


class ChainImage:
    """Read-only view of the disk that a chain of data files restores to."""

    def __init__(
        self,
        paths: list[str],
        cache_bytes: int = DEFAULT_CACHE,
        indexes: list[FileIndex] | None = None,
    ) -> None:
        """``indexes``: the files' indexes when the caller has them already
        (a file being checked before it gets its final name and side file)."""
        if not paths:
            raise StreamError("no data files to serve")
        self.paths = paths
        self._fds: list[int] = []
        given = indexes
        try:
            indexes = []
            for i, path in enumerate(paths):
                with open(path, "rb") as fh:
                    indexes.append(given[i] if given else open_index(path, fh))
                    self._fds.append(os.dup(fh.fileno()))
        except OSError as err:
            self.close()
            raise StreamError(f"cannot open {err.filename}: {err.strerror}") from None
        except BaseException:
            self.close()
            raise
        self.size = indexes[0].virtual_size
        for path, idx in zip(paths, indexes, strict=True):
            if idx.virtual_size != self.size:
                self.close()
                raise StreamError(
                    f"{path}: disk size {idx.virtual_size} differs from {paths[0]}'s {self.size}"
                )
        self.segments = merge_layers(indexes, self.size)
        self._starts = [s.start for s in self.segments]
        # The cache's slices and those of a piece per decompressing thread.
        self._slices = SlicePool(SLICE, cache_bytes // SLICE + 32 * DECOMPRESSIONS)
        self._cache = PieceCache(cache_bytes, drop=self._slices.recycle)
        # Per uncompressed extent with sums: which of its units were checked.
        self._checked: dict[tuple[int, int], bytearray] = {}
        # A piece is held whole while it is decompressed: with one per
        # server thread (nbdkit runs 16) that was 512 MiB beside the cache.
        # More at once than there are cores would not be faster anyway.
        self._decompressing = threading.BoundedSemaphore(DECOMPRESSIONS)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _segments_from(self, offset: int) -> Iterator[Segment]:
        i = bisect.bisect_right(self._starts, offset) - 1
        while i < len(self.segments):
            yield self.segments[i]
            i += 1

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the disk's bytes from ``offset``."""
        end = offset + len(buf)
        if offset < 0 or end > self.size:
            raise StreamError(f"read {offset}+{len(buf)} beyond the disk size {self.size}")
        pos = offset
        for seg in self._segments_from(offset):
            if pos >= end:
                break
            take = min(seg.end, end) - pos
            out = buf[pos - offset : pos - offset + take]
            if seg.extent is None:
                for i in range(0, take, len(_ZEROES)):
                    n = min(len(_ZEROES), take - i)
                    out[i : i + n] = _ZEROES[:n]
            elif seg.extent.pieces:
                self._read_packed(seg.layer, seg.extent, pos - seg.extent.start, out)
            elif seg.extent.sums:
                self._read_units(seg.layer, seg.extent, pos - seg.extent.start, out)
            else:  # no sums (2.x's sets, a rebuilt index): nothing to check against
                self._pread(seg.layer, out, seg.extent.offset + pos - seg.extent.start)
            pos += take

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def extents(
        self, offset: int, length: int, limit: int = 0
    ) -> list[tuple[int, int, bool]]:
        """(offset, length, reads as zero) runs from ``offset`` on, up to
        ``offset+length`` or, with ``limit``, at most that many runs."""
        end = min(offset + length, self.size)
        runs: list[tuple[int, int, bool]] = []
        for seg in self._segments_from(offset):
            if seg.start >= end or (limit and len(runs) == limit):
                break
            start = max(seg.start, offset)
            runs.append((start, min(seg.end, end) - start, seg.extent is None))
        return runs

    def _pread(self, layer: int, out: memoryview, position: int) -> None:
        while out:
            n = os.preadv(self._fds[layer], [out], position)
            if n <= 0:
                raise StreamError(
                    f"{self.paths[layer]}: file ends at offset {position} inside a data frame "
                    "(the file is truncated)"
                )
            out, position = out[n:], position + n

    def _read_packed(self, layer: int, extent: Extent, skip: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes from ``skip`` bytes into a compressed extent."""
        position = extent.offset
        base = 0
        done = 0
        for number, (packed, unpacked) in enumerate(extent.pieces):
            if skip + done < base + unpacked and done < len(out):
                summed = extent.sums[number] if extent.sums else None
                piece = self._piece(layer, position, packed, unpacked, summed)
                try:
                    first = skip + done - base
                    n = min(unpacked - first, len(out) - done)
                    piece.copy_into(out[done : done + n], first)
                finally:
                    self._cache.release(piece)
                done += n
            position += packed
            base += unpacked
        if done != len(out):
            raise StreamError(
                f"{self.paths[layer]}: compressed extent at {extent.start} is shorter than "
                "its index says"
            )

    def _read_units(self, layer: int, extent: Extent, skip: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes from ``skip`` bytes into an uncompressed
        extent whose payload the index sums per ``SUM_UNIT``: each unit is
        read whole and checked once, before the first of its bytes is
        served; then its bytes are read straight into the reply."""
        checked = self._checked.get((layer, extent.offset))
        if checked is None:
            units = -(-extent.length // SUM_UNIT)
            checked = self._checked.setdefault((layer, extent.offset), bytearray(units))
        first = skip // SUM_UNIT
        last = (skip + len(out) - 1) // SUM_UNIT
        for number in range(first, last + 1):
            if not checked[number]:
                self._check_unit(layer, extent, number)
                checked[number] = 1
        self._pread(layer, out, extent.offset + skip)

    def _check_unit(self, layer: int, extent: Extent, number: int) -> None:
        start = number * SUM_UNIT
        length = min(SUM_UNIT, extent.length - start)
        position = extent.offset + start
        # Not a threading.local: nbdkit's Python plugin drops the thread
        # state, and with it such a buffer, after each call.
        buffer = self._slices.get(SUM_UNIT)
        try:
            self._pread(layer, buffer[:length], position)
            value = adler32(buffer[:length])
        finally:
            self._slices.put(buffer)
        if value != extent.sums[number]:
            raise StreamError(
                f"{self.paths[layer]} at offset {position}: {length} bytes of data have "
                f"checksum {value}, its index says {extent.sums[number]} (the data is damaged)"
            )

    def _piece(
        self, layer: int, position: int, packed: int, unpacked: int, summed: int | None
    ) -> Piece:
        return self._cache.get_or_load(
            (layer, position),
            lambda: self._decompress(layer, position, packed, unpacked, summed),
        )

    def _decompress(
        self, layer: int, position: int, packed: int, unpacked: int, summed: int | None
    ) -> Piece:
        """One piece, checked before any of its bytes is served: against the
        Adler-32 of its stored bytes that the index holds or, without one,
        by the frame's own xxHash checksums."""
        where = f"{self.paths[layer]} at offset {position}"
        fd = self._fds[layer]
        stored = _StoredSum()
        with self._decompressing:
            slices = decompressed_slices(
                fd,
                position,
                packed,
                unpacked,
                where,
                SLICE,
                ledger=stored if summed is not None else None,
                check=summed is None,
                allocate=self._slices.get,
            )
            piece = Piece(list(slices))
        if summed is not None and stored.value != summed:
            self._slices.recycle(piece)
            raise StreamError(
                f"{where}: compressed piece has checksum {stored.value}, its index says "
                f"{summed} (the data is damaged)"
            )
        return piece


class _StoredSum:
    """The Adler-32 of a piece's stored bytes, read in order."""

    def __init__(self) -> None:
        self.value = 1

    def add(self, offset: int, data: bytes | memoryview) -> None:
        self.value = adler32(data, self.value)
