"""Write one data file in the stream format.

Frames are written strictly in order. With compression, each piece of a
data extent is compressed on a thread pool (lz4 releases the GIL) while
later pieces are read; the output order is kept by a queue of literal bytes
and pending compressions that is drained from the front.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import BinaryIO

import lz4.frame

from ..errors import StreamError
from . import frames
from .checksum import adler32
from .frames import HEADER_SIZE, MAX_REQUEST_SIZE, TERMINATOR, Kind, TrailerEntry
from .index import FINGERPRINT_SPAN, Extent, FileIndex, fingerprint_of
from .meta import StreamMeta

Buffer = bytes | bytearray | memoryview


COMPRESS_SLICE = 1024 * 1024


def compress_pieces(data: Buffer, level: int) -> list[bytes]:
    """One standard LZ4 frame with content size and both checksums, in parts.

    Fed in slices, lz4 never holds a second copy of a 32 MiB piece's output
    (its one-shot call does, briefly); the bytes are the same.
    """
    packer = lz4.frame.LZ4FrameCompressor(
        compression_level=level, block_checksum=True, content_checksum=True
    )
    view = memoryview(data)
    parts = [packer.begin(source_size=len(view))]
    for pos in range(0, len(view), COMPRESS_SLICE):
        part = packer.compress(view[pos : pos + COMPRESS_SLICE])
        if part:
            parts.append(part)
    parts.append(packer.flush())
    return parts


@dataclass(frozen=True)
class _PendingPiece:
    future: Future[list[bytes]]
    sizes: list[int]
    index: int


class ChecksumWriter:
    """Pass writes through to a binary file, keeping their Adler-32 and the
    first and last bytes written (the index fingerprint)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.adler32 = 1
        self.written = 0
        self.head = bytearray()
        self.tail = bytearray()

    def write(self, data: Buffer) -> None:
        self.raw.write(data)
        self.adler32 = adler32(data, self.adler32)
        self.written += len(data)
        if len(self.head) < FINGERPRINT_SPAN:
            self.head += memoryview(data)[: FINGERPRINT_SPAN - len(self.head)]
        if len(data) >= FINGERPRINT_SPAN:
            self.tail = bytearray(memoryview(data)[-FINGERPRINT_SPAN:])
        else:
            self.tail += data
            del self.tail[: max(0, len(self.tail) - FINGERPRINT_SPAN)]


class StreamWriter:
    """Writes meta, extent frames, stop and (compressed) the trailer.

    ``max_piece`` is the maximum NBD request size of the source: compressed
    extents of at least that size are cut into pieces of that size.
    ``executor`` compresses pieces in parallel; ``window`` bounds how many
    pieces may wait for compression (and so the memory in use).
    """

    def __init__(
        self,
        out: BinaryIO,
        meta: StreamMeta,
        *,
        max_piece: int = MAX_REQUEST_SIZE,
        executor: Executor | None = None,
        window: int = 4,
    ) -> None:
        self._out = ChecksumWriter(out)
        self._meta = meta
        self._level = None if meta.compressed is False else int(meta.compressed)
        self._max_piece = max_piece
        self._executor = executor
        self._window = max(1, window)
        self._queue: deque[Buffer | _PendingPiece] = deque()
        self._pending_pieces = 0
        self._free_pieces: list[bytearray] = []  # appended to by compression threads
        # Per data frame: its length and its pieces' compressed sizes.
        self._pieces: list[tuple[int, list[int]]] = []
        self._next_offset = 0
        self._data_size = 0
        # Extent frames in file order, for the index: (kind, start, length).
        self._frames: list[tuple[Kind, int, int]] = []
        doc = json.dumps(meta.to_json(), indent=4).encode()
        self._meta_bytes = HEADER_SIZE + len(doc) + len(TERMINATOR)
        self._emit(frames.encode(Kind.META, 0, len(doc)) + doc + TERMINATOR)

    @property
    def compressed(self) -> bool:
        return self._level is not None

    def zero(self, offset: int, length: int) -> None:
        self._check_order(offset, length)
        self._frames.append((Kind.ZERO, offset, length))
        self._emit(frames.encode(Kind.ZERO, offset, length))

    def data(self, offset: int, length: int, chunks: Iterable[Buffer]) -> None:
        """One data frame of ``length`` bytes at ``offset``, from ``chunks``."""
        self._check_order(offset, length)
        self._frames.append((Kind.DATA, offset, length))
        self._emit(frames.encode(Kind.DATA, offset, length))
        if self._level is None:
            got = 0
            for chunk in chunks:
                got += len(chunk)
                self._emit(chunk)
        else:
            got = self._compressed_payload(length, chunks)
        if got != length:
            raise StreamError(
                f"extent at offset {offset}: got {got} bytes from the source, expected {length}"
            )
        self._data_size += length
        self._emit(TERMINATOR)

    def finish(self) -> int:
        """Write stop (and the trailer); return the file's Adler-32."""
        self._emit(frames.encode(Kind.STOP, 0, 0))
        self._drain(0)
        if self._data_size != self._meta.data_size:
            raise StreamError(
                f"disk {self._meta.disk_name}: wrote {self._data_size} data bytes "
                f"but the meta frame announced {self._meta.data_size}"
            )
        if self._level is not None:
            trailer = json.dumps(self._trailer()).encode()
            self._out_bytes(trailer + TERMINATOR + frames.encode(Kind.COMP, 0, len(trailer)))
        return self._out.adler32

    @property
    def bytes_written(self) -> int:
        return self._out.written

    def index(self, file_name: str) -> FileIndex:
        """The extent index of the file written; call after ``finish()``."""
        extents = []
        position = self._meta_bytes
        frame_pieces = iter(self._pieces)
        for kind, start, length in self._frames:
            position += HEADER_SIZE
            if kind is Kind.ZERO:
                extents.append(Extent(start, length, -1))
                continue
            if self._level is None:
                extents.append(Extent(start, length, position))
                position += length
            else:
                _length, sizes = next(frame_pieces)
                piece = self._max_piece if length >= self._max_piece else length
                unpacked = [min(piece, length - i * piece) for i in range(len(sizes))]
                packed = tuple(zip(sizes, unpacked, strict=True))
                extents.append(Extent(start, length, position, packed))
                position += sum(sizes)
            position += len(TERMINATOR)
        return FileIndex(
            data_file=file_name,
            file_size=self._out.written,
            fingerprint=fingerprint_of(bytes(self._out.head), bytes(self._out.tail)),
            virtual_size=self._meta.virtual_size,
            compressed=self._level is not None,
            extents=extents,
        )

    def _check_order(self, offset: int, length: int) -> None:
        if offset < self._next_offset or length <= 0:
            raise ValueError(f"extent {offset}+{length} out of order or empty")
        self._next_offset = offset + length

    def _compressed_payload(self, length: int, chunks: Iterable[Buffer]) -> int:
        sizes: list[int] = []
        self._pieces.append((length, sizes))
        piece_size = self._max_piece if length >= self._max_piece else length
        piece = self._piece_buffer()
        filled = got = 0
        for chunk in chunks:
            view = memoryview(chunk)
            got += len(view)
            while view:
                n = min(len(view), piece_size - filled)
                piece[filled : filled + n] = view[:n]
                filled += n
                view = view[n:]
                if filled == piece_size:
                    self._add_piece(piece, filled, sizes)
                    piece = self._piece_buffer()
                    filled = 0
        if filled:
            self._add_piece(piece, filled, sizes)
        else:
            self._free_pieces.append(piece)
        return got

    def _piece_buffer(self) -> bytearray:
        """A buffer for one piece; freed ones are reused, so memory stays flat."""
        return self._free_pieces.pop() if self._free_pieces else bytearray(self._max_piece)

    def _compress(self, piece: bytearray, length: int) -> list[bytes]:
        assert self._level is not None
        packed = compress_pieces(memoryview(piece)[:length], self._level)
        self._free_pieces.append(piece)
        return packed

    def _add_piece(self, piece: bytearray, length: int, sizes: list[int]) -> None:
        if self._executor is None:
            packed = self._compress(piece, length)
            sizes.append(sum(len(p) for p in packed))
            for part in packed:
                self._emit(part)
            return
        self._drain(self._window - 1)
        future = self._executor.submit(self._compress, piece, length)
        sizes.append(-1)  # filled in when the piece is written
        self._queue.append(_PendingPiece(future, sizes, len(sizes) - 1))
        self._pending_pieces += 1

    def _emit(self, data: Buffer) -> None:
        if self._queue:
            self._queue.append(data)
        else:
            self._out_bytes(data)

    def _drain(self, keep_pieces: int) -> None:
        """Write queued output until at most ``keep_pieces`` compressions wait."""
        while self._queue and (
            self._pending_pieces > keep_pieces or not isinstance(self._queue[0], _PendingPiece)
        ):
            item = self._queue.popleft()
            if isinstance(item, _PendingPiece):
                self._pending_pieces -= 1
                packed = item.future.result()
                item.sizes[item.index] = sum(len(p) for p in packed)
                for part in packed:
                    self._out_bytes(part)
            else:
                self._out_bytes(item)

    def _out_bytes(self, data: Buffer) -> None:
        self._out.write(data)

    def _trailer(self) -> list[TrailerEntry]:
        entries: list[TrailerEntry] = []
        for length, sizes in self._pieces:
            if length < self._max_piece:
                entries.append(sizes[0])
            else:
                entries.append({str(sum(sizes)): sizes})
        return entries
