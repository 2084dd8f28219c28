"""Frame headers: ``KIND START LENGTH\\r\\n``, exactly 40 ASCII bytes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..errors import StreamError

HEADER_SIZE = 40
TERMINATOR = b"\r\n"
STREAM_VERSION = 2
COMPRESSION_METHOD = "lz4"
# Largest NBD request, and the piece size of compressed data frames.
MAX_REQUEST_SIZE = 32 * 1024 * 1024


class Kind(Enum):
    META = b"meta"
    DATA = b"data"
    ZERO = b"zero"
    STOP = b"stop"
    COMP = b"comp"


@dataclass(frozen=True)
class Header:
    kind: Kind
    start: int
    length: int


def encode(kind: Kind, start: int, length: int) -> bytes:
    if not 0 <= start < 1 << 64 or not 0 <= length < 1 << 64:
        raise ValueError(f"frame field out of range: start={start} length={length}")
    raw = b"%s %016x %016x\r\n" % (kind.value, start, length)
    assert len(raw) == HEADER_SIZE
    return raw


def decode(raw: bytes, where: str) -> Header:
    """Parse one header; ``where`` names the file and offset for errors."""
    if len(raw) < HEADER_SIZE:
        raise StreamError(
            f"{where}: stream ends after {len(raw)} of {HEADER_SIZE} header bytes "
            "(the file is truncated)"
        )
    if raw[38:40] != TERMINATOR:
        raise StreamError(f"{where}: frame header does not end with CR LF: {raw!r}")
    parts = raw[:38].split(b" ")
    try:
        kind = Kind(parts[0])
        start, length = int(parts[1], 16), int(parts[2], 16)
    except (ValueError, IndexError):
        raise StreamError(f"{where}: not a frame header: {raw!r}") from None
    if len(parts) != 3:
        raise StreamError(f"{where}: not a frame header: {raw!r}")
    return Header(kind, start, length)
