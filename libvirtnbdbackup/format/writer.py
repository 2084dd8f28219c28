"""Write one data file in the stream format.

Frames are written strictly in order. A compressed data frame is either
compressed here as its bytes arrive (``data``), or arrives compressed
(``packed``), from compressions run elsewhere in parallel.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from typing import BinaryIO

import lz4.frame

from ..errors import StreamError
from . import frames
from .checksum import adler32
from .frames import HEADER_SIZE, MAX_REQUEST_SIZE, TERMINATOR, Kind, TrailerEntry
from .index import FINGERPRINT_SPAN, SUM_UNIT, Extent, FileIndex, fingerprint_of
from .meta import StreamMeta
from .reader import adler32_concat

Buffer = bytes | bytearray | memoryview


LZ4_BLOCK = 64 * 1024  # lz4.frame's default block size


class PieceCompressor:
    """One LZ4 frame of the format (content size, block and content
    checksums), fed as the piece's bytes arrive.

    Its bytes are those of the existing tool's one-shot
    ``lz4.frame.compress`` of the whole piece, without ever holding the
    piece. A one-shot call compresses each 64 KiB block with the previous
    block right before it in memory. lz4's streaming compressor does the
    same only for blocks it assembles in its own buffer, where it keeps the
    last 64 KiB as the window; a block it takes straight from the caller's
    buffer loses that contiguity and compresses differently. So the bytes
    are fed cut one byte past each block boundary: every call then
    completes the block already begun inside lz4, and starts the next one
    there. A piece that fits in one block is compressed in one shot, because
    that call flags such a frame's blocks as independent.
    """

    def __init__(self, length: int, level: int) -> None:
        self._level = level
        self._small: bytearray | None = bytearray() if length <= LZ4_BLOCK else None
        self._packer = lz4.frame.LZ4FrameCompressor(
            compression_level=level, block_checksum=True, content_checksum=True
        )
        self._begun = False
        self._fed = 0
        self._length = length

    def feed(self, data: Buffer) -> list[bytes]:
        """The frame's next bytes; the compressed parts they complete."""
        if self._small is not None:
            self._small += data
            return []
        parts = []
        if not self._begun:
            parts.append(self._packer.begin(source_size=self._length))
            self._begun = True
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            # Up to one byte past the next block boundary (the first call: one byte).
            cut = self._fed - (self._fed - 1) % LZ4_BLOCK + LZ4_BLOCK if self._fed else 1
            n = min(cut - self._fed, len(view) - pos)
            part = self._packer.compress(view[pos : pos + n])
            if part:
                parts.append(part)
            pos += n
            self._fed += n
        return parts

    def finish(self) -> list[bytes]:
        """The frame's last compressed parts."""
        if self._small is not None:
            frame = lz4.frame.compress(
                self._small,
                compression_level=self._level,
                block_checksum=True,
                content_checksum=True,
            )
            return [frame]
        parts = [] if self._begun else [self._packer.begin(source_size=self._length)]
        return [*parts, self._packer.flush()]


def compress_pieces(data: Buffer, level: int) -> list[bytes]:
    """``data`` as one LZ4 frame of the format, in parts."""
    packer = PieceCompressor(len(data), level)
    return packer.feed(data) + packer.finish()


def piece_lengths(length: int, max_piece: int) -> list[int]:
    """How a compressed data frame of ``length`` bytes is cut into LZ4 frames."""
    if length < max_piece:
        return [length]
    return [min(max_piece, length - pos) for pos in range(0, length, max_piece)]


class ChecksumWriter:
    """Pass writes through to a binary file, keeping their Adler-32 and the
    first and last bytes written (the index fingerprint)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.adler32 = 1
        self.written = 0
        self.head = bytearray()
        # The last writes, together at least FINGERPRINT_SPAN bytes: bytes
        # objects by reference (compressed parts, many per piece), the end of
        # any other buffer copied, as the caller may reuse it.
        self._last: deque[bytes] = deque()
        self._last_size = 0

    def write(self, data: Buffer, summed: int | None = None) -> None:
        """``summed``: the Adler-32 of ``data`` alone, when the caller has it."""
        self.raw.write(data)
        if summed is None:
            self.adler32 = adler32(data, self.adler32)
        else:
            self.adler32 = adler32_concat(self.adler32, summed, len(data))
        self.written += len(data)
        if len(self.head) < FINGERPRINT_SPAN:
            self.head += memoryview(data)[: FINGERPRINT_SPAN - len(self.head)]
        kept = data if isinstance(data, bytes) else bytes(memoryview(data)[-FINGERPRINT_SPAN:])
        self._last.append(kept)
        self._last_size += len(kept)
        while self._last_size - len(self._last[0]) >= FINGERPRINT_SPAN:
            self._last_size -= len(self._last.popleft())

    @property
    def tail(self) -> bytes:
        """The last ``FINGERPRINT_SPAN`` bytes written."""
        return b"".join(self._last)[-FINGERPRINT_SPAN:]


class StreamWriter:
    """Writes meta, extent frames, stop and (compressed) the trailer.

    ``max_piece`` is the maximum NBD request size of the source: compressed
    extents of at least that size are cut into pieces of that size.
    """

    def __init__(self, out: BinaryIO, meta: StreamMeta, *, max_piece: int = MAX_REQUEST_SIZE):
        self._out = ChecksumWriter(out)
        self._meta = meta
        self._level = None if meta.compressed is False else int(meta.compressed)
        self._max_piece = max_piece
        # Per data frame: its length and its pieces' compressed sizes.
        self._pieces: list[tuple[int, list[int]]] = []
        # Per compressed data frame: the Adler-32 of each piece's stored bytes,
        # those of the frame being written, and of the piece being written.
        self._sums: list[list[int]] = []
        self._done_sums: list[int] = []
        self._piece_sum = 1
        # Per uncompressed data frame: the Adler-32 of each SUM_UNIT of its payload.
        self._plain_sums: list[list[int]] = []
        # Unpacked piece sizes of copied frames, which another writer cut.
        self._unpacked: dict[int, list[int]] = {}
        self._next_offset = 0
        self._data_size = 0
        # Extent frames in file order, for the index: (kind, start, length);
        # kind None: a zero range of an incremental stream, in no frame.
        self._frames: list[tuple[Kind | None, int, int]] = []
        doc = json.dumps(meta.to_json(), indent=4).encode()
        self._meta_bytes = HEADER_SIZE + len(doc) + len(TERMINATOR)
        self._out.write(frames.encode(Kind.META, 0, len(doc)) + doc + TERMINATOR)

    @property
    def compressed(self) -> bool:
        return self._level is not None

    @property
    def max_piece(self) -> int:
        return self._max_piece

    def zero(self, offset: int, length: int) -> None:
        """A range that reads as zeros: a ``zero`` frame, except in an
        incremental stream, which holds ``data`` frames only: there it is
        kept for the ``.zeros`` side file (``side_zeros``)."""
        self._check_order(offset, length)
        if self._meta.incremental:
            self._frames.append((None, offset, length))
            return
        self._frames.append((Kind.ZERO, offset, length))
        self._out.write(frames.encode(Kind.ZERO, offset, length))

    @property
    def side_zeros(self) -> list[tuple[int, int]]:
        """The zero ranges of an incremental stream, which no frame holds."""
        return [(start, length) for kind, start, length in self._frames if kind is None]

    def data(self, offset: int, length: int, chunks: Iterable[Buffer]) -> None:
        """One data frame of ``length`` bytes at ``offset``, from ``chunks``."""
        self._start_data(offset, length)
        plain = self._level is None
        got = self._write_plain(chunks) if plain else self._compress(length, chunks)
        self._end_data(offset, length, got)

    def _write_plain(self, chunks: Iterable[Buffer]) -> int:
        """Write an uncompressed payload as it comes, summing each
        ``SUM_UNIT`` of it for the index; its byte count."""
        sums: list[int] = []
        value, filled, got = 1, 0, 0
        for chunk in chunks:
            view = memoryview(chunk)
            got += len(view)
            while view:
                part = view[: SUM_UNIT - filled]
                summed = adler32(part)
                self._out.write(part, summed)
                value = adler32_concat(value, summed, len(part))
                filled += len(part)
                view = view[len(part) :]
                if filled == SUM_UNIT:
                    sums.append(value)
                    value, filled = 1, 0
        if filled:
            sums.append(value)
        self._plain_sums.append(sums)
        return got

    def packed(self, offset: int, length: int, pieces: Iterable[Iterable[bytes]]) -> None:
        """One compressed data frame whose pieces are compressed elsewhere
        (``PieceCompressor``, cut as ``piece_lengths`` says); each piece's
        parts are written as they come."""
        if self._level is None:
            raise ValueError("packed data frame in an uncompressed stream")
        self._start_data(offset, length)
        sizes = [self._write_parts(parts) for parts in pieces]
        if len(sizes) != len(piece_lengths(length, self._max_piece)):
            raise ValueError(f"extent at offset {offset}: wrong number of pieces")
        self._add_pieces(length, sizes)
        self._end_data(offset, length, length)

    def assembled(
        self,
        offset: int,
        length: int,
        pieces: Iterable[tuple[int, int | None, Iterable[Buffer]]],
    ) -> None:
        """One compressed data frame made of pieces that are each either
        copied as another file stores them or compressed here.

        ``pieces`` yields (unpacked size, packed size or None, chunks): with
        a packed size the chunks are an LZ4 frame of the format, written as
        they are; without, they are the piece's bytes, compressed into one
        LZ4 frame. A frame below ``max_piece`` must be one piece (2.x reads
        it as one LZ4 frame); each piece holds at most ``max_piece`` bytes.
        """
        if self._level is None:
            raise ValueError("assembled compressed frame in an uncompressed stream")
        self._start_data(offset, length)
        sizes: list[int] = []
        unpacked_sizes: list[int] = []
        for unpacked, packed, chunks in pieces:
            if unpacked > self._max_piece:
                raise ValueError(f"extent at offset {offset}: piece of {unpacked} bytes")
            if packed is None:
                packer = PieceCompressor(unpacked, self._level)
                size = got = 0
                for chunk in chunks:
                    got += len(chunk)
                    size += self._write_parts(packer.feed(chunk), more=True)
                size += self._write_parts(packer.finish())
                if got != unpacked:
                    raise StreamError(f"extent at offset {offset}: piece got {got} bytes")
            else:
                size = self._write_parts(chunks)
                if size != packed:
                    raise StreamError(f"extent at offset {offset}: copied {size} stored bytes")
            sizes.append(size)
            unpacked_sizes.append(unpacked)
        if sum(unpacked_sizes) != length or (length < self._max_piece and len(sizes) != 1):
            raise ValueError(f"extent at offset {offset}: pieces do not make {length} bytes")
        self._add_pieces(length, sizes)
        self._unpacked[len(self._pieces) - 1] = unpacked_sizes
        self._end_data(offset, length, length)

    def _start_data(self, offset: int, length: int) -> None:
        self._check_order(offset, length)
        self._frames.append((Kind.DATA, offset, length))
        self._out.write(frames.encode(Kind.DATA, offset, length))

    def _end_data(self, offset: int, length: int, got: int) -> None:
        if got != length:
            raise StreamError(
                f"extent at offset {offset}: got {got} bytes from the source, expected {length}"
            )
        self._data_size += length
        self._out.write(TERMINATOR)

    def finish(self) -> int:
        """Write stop (and the trailer); return the file's Adler-32."""
        self._out.write(frames.encode(Kind.STOP, 0, 0))
        if self._data_size != self._meta.data_size:
            raise StreamError(
                f"disk {self._meta.disk_name}: wrote {self._data_size} data bytes "
                f"but the meta frame announced {self._meta.data_size}"
            )
        if self._level is not None:
            trailer = json.dumps(self._trailer()).encode()
            self._out.write(trailer + TERMINATOR + frames.encode(Kind.COMP, 0, len(trailer)))
        return self._out.adler32

    @property
    def bytes_written(self) -> int:
        return self._out.written

    def index(self, file_name: str) -> FileIndex:
        """The extent index of the file written; call after ``finish()``."""
        extents = []
        position = self._meta_bytes
        frame_pieces = iter(enumerate(self._pieces))
        plain_sums = iter(self._plain_sums)
        for kind, start, length in self._frames:
            if kind is None:
                extents.append(Extent(start, length, -1))
                continue
            position += HEADER_SIZE
            if kind is Kind.ZERO:
                extents.append(Extent(start, length, -1))
                continue
            if self._level is None:
                sums = tuple(next(plain_sums))
                extents.append(Extent(start, length, position, (), sums))
                position += length
            else:
                number, (_length, sizes) = next(frame_pieces)
                unpacked = self._unpacked.get(number) or piece_lengths(length, self._max_piece)
                packed = tuple(zip(sizes, unpacked, strict=True))
                sums = tuple(self._sums[number])
                extents.append(Extent(start, length, position, packed, sums))
                position += sum(sizes)
            position += len(TERMINATOR)
        return FileIndex(
            data_file=file_name,
            file_size=self._out.written,
            fingerprint=fingerprint_of(bytes(self._out.head), self._out.tail),
            virtual_size=self._meta.virtual_size,
            compressed=self._level is not None,
            extents=extents,
            data_checksum=self._out.adler32,
        )

    def _check_order(self, offset: int, length: int) -> None:
        if offset < self._next_offset or length <= 0:
            raise ValueError(f"extent {offset}+{length} out of order or empty")
        self._next_offset = offset + length

    def _compress(self, length: int, chunks: Iterable[Buffer]) -> int:
        """Compress the frame's bytes piece by piece as they arrive; their count."""
        assert self._level is not None
        sizes: list[int] = []
        lengths = piece_lengths(length, self._max_piece)
        packer = PieceCompressor(lengths[0], self._level)
        index = filled = got = size = 0
        for chunk in chunks:
            view = memoryview(chunk)
            got += len(view)
            while view and index < len(lengths):
                n = min(len(view), lengths[index] - filled)
                size += self._write_parts(packer.feed(view[:n]), more=True)
                filled += n
                view = view[n:]
                if filled == lengths[index]:
                    sizes.append(size + self._write_parts(packer.finish()))
                    index, filled, size = index + 1, 0, 0
                    if index < len(lengths):
                        packer = PieceCompressor(lengths[index], self._level)
        self._add_pieces(length, sizes)
        return got

    def _write_parts(self, parts: Iterable[Buffer], more: bool = False) -> int:
        """Write compressed parts of a piece as they come; their byte count.
        The piece's Adler-32 is kept; ``more``: the piece goes on after them."""
        size = 0
        value = self._piece_sum
        for part in parts:
            summed = adler32(part)
            self._out.write(part, summed)
            value = adler32_concat(value, summed, len(part))
            size += len(part)
        if more:
            self._piece_sum = value
        else:
            self._done_sums.append(value)
            self._piece_sum = 1
        return size

    def _add_pieces(self, length: int, sizes: list[int]) -> None:
        """Close a compressed data frame: its pieces' sizes and Adler-32 values."""
        if len(self._done_sums) != len(sizes):
            raise ValueError(f"{len(sizes)} pieces but {len(self._done_sums)} checksums")
        self._pieces.append((length, sizes))
        self._sums.append(self._done_sums)
        self._done_sums = []

    def _trailer(self) -> list[TrailerEntry]:
        entries: list[TrailerEntry] = []
        for length, sizes in self._pieces:
            if length < self._max_piece and len(sizes) == 1:
                entries.append(sizes[0])
            else:
                entries.append({str(sum(sizes)): sizes})
        return entries
