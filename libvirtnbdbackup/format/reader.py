"""Read and check one data file in the stream format."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import lz4.frame

from ..errors import StreamError
from . import frames
from .checksum import adler32
from .frames import (
    HEADER_SIZE,
    MAX_JSON_SIZE,
    MAX_REQUEST_SIZE,
    TERMINATOR,
    Header,
    Kind,
    TrailerEntry,
)
from .meta import StreamMeta

CHUNK_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class Frame:
    kind: Kind
    start: int
    length: int
    position: int  # offset of the frame header in the file


class StreamReader:
    """Iterates over the extent frames of a data file, checking as it goes.

    ``frames()`` yields ``data`` and ``zero`` frames in file order; the
    payload of a data frame is read with ``payload(frame)`` before the next
    frame is asked for (it is skipped when not read). A truncated file, a
    damaged header or payload, or a ``dataSize`` that does not add up raises
    :class:`StreamError` naming the file and the offset.
    """

    def __init__(self, fh: BinaryIO, name: str) -> None:
        self._fh = fh
        self.name = name
        self._pos = 0
        header = self._header()
        _check_meta_header(header, self._where(0))
        raw = self._read_exact(header.length, "meta JSON")
        self._expect_terminator()
        try:
            doc = json.loads(raw)
        except ValueError as err:
            raise StreamError(f"{self._where(HEADER_SIZE)}: meta JSON is damaged: {err}") from None
        self.meta = StreamMeta.from_json(doc, name)
        self._trailer: list[TrailerEntry] = []
        if self.meta.is_compressed:
            self._trailer = self._read_trailer()
        self._unread: Frame | None = None
        self._data_frames_read = 0

    @property
    def trailer(self) -> list[TrailerEntry]:
        """The compression trailer: one entry per data frame (empty uncompressed)."""
        return self._trailer

    @property
    def position(self) -> int:
        """Offset in the file of the next frame header."""
        return self._pos

    def frames(self) -> Iterator[Frame]:
        data_size = 0
        data_frames = 0
        while True:
            if self._unread is not None:
                self._skip_payload(self._unread)
            position = self._pos
            header = self._header()
            if header.kind is Kind.STOP:
                break
            if header.kind not in (Kind.DATA, Kind.ZERO):
                raise StreamError(
                    f"{self._where(position)}: unexpected {header.kind.value.decode()} frame"
                )
            frame = Frame(header.kind, header.start, header.length, position)
            if frame.start + frame.length > self.meta.virtual_size:
                raise StreamError(
                    f"{self._where(position)}: extent {frame.start}+{frame.length} lies beyond "
                    f"the disk size {self.meta.virtual_size}"
                )
            if frame.kind is Kind.DATA:
                if self.meta.is_compressed and data_frames >= len(self._trailer):
                    raise StreamError(
                        f"{self._where(position)}: more data frames than compression trailer "
                        "entries"
                    )
                data_frames += 1
                data_size += frame.length
                self._unread = frame
            yield frame
        if data_size != self.meta.data_size:
            raise StreamError(
                f"{self.name}: data frames hold {data_size} bytes but the meta frame says "
                f"dataSize {self.meta.data_size}"
            )

    def payload(self, frame: Frame, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        """The bytes of ``frame``, in chunks of at most ``chunk_size``."""
        if frame is not self._unread:
            raise ValueError("payload() must follow the frame it belongs to")
        self._unread = None
        if self.meta.is_compressed:
            yield from self._compressed_payload(frame, chunk_size)
        else:
            left = frame.length
            while left:
                n = min(left, chunk_size)
                yield memoryview(self._read_exact(n, f"data of extent at {frame.start}"))
                left -= n
        self._expect_terminator()

    def _compressed_payload(self, frame: Frame, chunk_size: int) -> Iterator[memoryview]:
        entry = self._trailer[self._data_frames_read]
        self._data_frames_read += 1
        sizes = [entry] if isinstance(entry, int) else next(iter(entry.values()))
        got = 0
        for size in sizes:
            where = self._where(self._pos)
            if size > 2 * MAX_REQUEST_SIZE:
                raise StreamError(f"{where}: compressed piece of {size} bytes is implausible")
            packed = self._read_exact(size, f"compressed data of extent at {frame.start}")
            lz4_content_size(packed, where)
            try:
                raw = memoryview(lz4.frame.decompress(packed))
            except RuntimeError as err:
                raise StreamError(f"{where}: compressed data is damaged: {err}") from None
            got += len(raw)
            for off in range(0, len(raw), chunk_size):
                yield raw[off : off + chunk_size]
        if got != frame.length:
            raise StreamError(
                f"{self._where(frame.position)}: extent decompresses to {got} bytes, "
                f"its header says {frame.length}"
            )

    def _skip_payload(self, frame: Frame) -> None:
        for _ in self.payload(frame):
            pass

    def _read_trailer(self) -> list[TrailerEntry]:
        end = self._fh.seek(0, os.SEEK_END)
        if end < 2 * HEADER_SIZE + 2:
            raise StreamError(f"{self.name}: compressed file too short to hold a trailer")
        self._fh.seek(end - HEADER_SIZE - 2)
        tail = self._fh.read(HEADER_SIZE + 2)
        header = frames.decode(tail[2:], self._where(end - HEADER_SIZE))
        if header.kind is not Kind.COMP or tail[:2] != TERMINATOR:
            raise StreamError(
                f"{self.name}: compressed stream lacks its trailer at the end "
                "(the file is truncated)"
            )
        start = end - HEADER_SIZE - 2 - header.length
        if header.length > MAX_JSON_SIZE or start < self._pos:
            raise StreamError(
                f"{self._where(end - HEADER_SIZE)}: compression trailer length "
                f"{header.length} does not fit the file (the file is damaged)"
            )
        self._fh.seek(start)
        raw = self._fh.read(header.length)
        self._fh.seek(self._pos)
        try:
            trailer: Any = json.loads(raw)
            if not isinstance(trailer, list):
                raise ValueError("not a list")
            for entry in trailer:
                _check_trailer_entry(entry)
        except ValueError as err:
            raise StreamError(
                f"{self._where(start)}: compression trailer is damaged: {err}"
            ) from None
        return trailer

    def _header(self) -> Header:
        position = self._pos
        return frames.decode(self._read_some(HEADER_SIZE), self._where(position))

    def _expect_terminator(self) -> None:
        position = self._pos
        if self._read_some(2) != TERMINATOR:
            raise StreamError(
                f"{self._where(position)}: expected CR LF after the frame payload "
                "(the file is damaged or truncated)"
            )

    def _read_exact(self, n: int, what: str) -> bytes:
        position = self._pos
        raw = self._read_some(n)
        if len(raw) != n:
            raise StreamError(
                f"{self._where(position)}: file ends after {len(raw)} of {n} bytes of {what} "
                "(the file is truncated)"
            )
        return raw

    def _read_some(self, n: int) -> bytes:
        raw = self._fh.read(n)
        self._pos += len(raw)
        return raw

    def _where(self, offset: int) -> str:
        return f"{self.name} at offset {offset}"


def lz4_content_size(head: bytes, where: str) -> int:
    """The content size an LZ4 frame's header announces (0 if it has none).

    Checked before decompressing: a damaged size would make lz4 allocate
    that much memory.
    """
    try:
        size = int(lz4.frame.get_frame_info(head)["content_size"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise StreamError(f"{where}: compressed data is damaged: {err}") from None
    if size > MAX_REQUEST_SIZE:
        raise StreamError(
            f"{where}: compressed data is damaged: it announces {size} bytes, more than "
            f"a piece holds"
        )
    return size


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_trailer_entry(entry: object) -> None:
    """An int, or {"<total>": [piece sizes]} whose pieces add up to the total."""
    if _is_count(entry):
        return
    if isinstance(entry, dict) and len(entry) == 1:
        ((total, pieces),) = entry.items()
        if (
            isinstance(pieces, list)
            and pieces
            and all(_is_count(p) for p in pieces)
            and str(sum(pieces)) == total
        ):
            return
    raise ValueError(f"bad entry {entry!r}")


def _check_meta_header(header: Header, where: str) -> None:
    if header.kind is not Kind.META:
        raise StreamError(f"{where}: file does not start with a meta frame")
    if header.start != 0:
        raise StreamError(f"{where}: meta frame header with START {header.start}, not 0 (damaged)")
    if header.length > MAX_JSON_SIZE:
        raise StreamError(f"{where}: meta length {header.length} is implausible (damaged header)")


def read_meta_doc(path: str) -> Any:
    """The meta JSON of a data file as stored (keys in the file's order),
    reading only its first frame."""
    with open(path, "rb") as fh:
        header = frames.decode(fh.read(HEADER_SIZE), f"{path} at offset 0")
        _check_meta_header(header, f"{path} at offset 0")
        raw = fh.read(header.length)
    try:
        return json.loads(raw)
    except ValueError as err:
        raise StreamError(f"{path}: meta JSON is damaged: {err}") from None


def read_meta(path: str) -> StreamMeta:
    """The meta of a data file, reading only its first frame."""
    return StreamMeta.from_json(read_meta_doc(path), path)


def is_stream_file(path: str) -> bool:
    """True for stream files, False for raw images (which have no frames).

    The name decides: only ``<disk>.copy.data`` without a ``.chksum`` can
    be a raw image (raw images get no checksum file). Any other data file
    is a stream, damaged or not: reading it then reports the damage with
    file and offset, instead of taking it for a raw image.
    """
    if not os.path.basename(path).endswith(".copy.data") or os.path.exists(path + ".chksum"):
        return True
    with open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE)
    try:
        return frames.decode(head, path).kind is Kind.META
    except StreamError:
        return False


ADLER_MOD = 65521
SEGMENT = 64 * 1024 * 1024


def adler32_concat(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of A + B from those of A and of B and B's length.

    Adler-32 keeps s1 = 1 + sum of bytes and s2 = sum of the s1 values.
    Starting B from A's s1 instead of 1 adds A1 - 1 to each of B's n
    running sums, so s1 = A1 + B1 - 1 and s2 = A2 + B2 + n * (A1 - 1).
    """
    a1, a2 = first & 0xFFFF, first >> 16
    b1, b2 = second & 0xFFFF, second >> 16
    s1 = (a1 + b1 - 1) % ADLER_MOD
    s2 = (a2 + b2 + second_length * (a1 - 1)) % ADLER_MOD
    return (s2 << 16) | s1


def file_adler32(path: str, chunk_size: int = 4 * 1024 * 1024, threads: int = 0) -> int:
    """Adler-32 of a file, over segments read and summed on several threads.

    adler32 and file reads release the GIL, so segments of 64 MiB
    are checked side by side and their sums joined with adler32_concat.
    """
    size = os.path.getsize(path)
    threads = threads or min(4, os.cpu_count() or 2)
    segments = [(pos, min(SEGMENT, size - pos)) for pos in range(0, size, SEGMENT)]
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(threads) as pool:
            sums = pool.map(lambda seg: _segment_adler32(fd, seg[0], seg[1], chunk_size), segments)
            value = 1
            for (_pos, length), part in zip(segments, sums, strict=True):
                value = adler32_concat(value, part, length)
    finally:
        os.close(fd)
    return value


def _segment_adler32(fd: int, start: int, length: int, chunk_size: int) -> int:
    value = 1
    buf = bytearray(min(chunk_size, length))
    view = memoryview(buf)
    pos, end = start, start + length
    while pos < end:
        n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
        if n <= 0:
            raise StreamError(f"file changed while being read: ends at offset {pos}")
        value = adler32(view[:n], value)
        pos += n
    return value
