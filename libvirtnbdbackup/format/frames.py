"""Frame headers: ``KIND START LENGTH\\r\\n``, exactly 40 ASCII bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ..errors import StreamError

HEADER_SIZE = 40
TERMINATOR = b"\r\n"
STREAM_VERSION = 2
COMPRESSION_METHOD = "lz4"
# Meta and trailer JSON are small; a larger length means a damaged header.
MAX_JSON_SIZE = 64 * 1024 * 1024
_HEADER = re.compile(rb"(.{4}) ([0-9a-fA-F]{16}) ([0-9a-fA-F]{16})", re.DOTALL)
# Largest NBD request, and the piece size of compressed data frames.
MAX_REQUEST_SIZE = 32 * 1024 * 1024
# A trailer entry: the compressed size of a one-piece extent, or
# {"<total compressed size>": [size of each piece]}.
TrailerEntry = int | dict[str, list[int]]


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
    match = _HEADER.fullmatch(raw[:38])
    if match is None:
        raise StreamError(f"{where}: not a frame header: {raw[:HEADER_SIZE]!r}")
    try:
        kind = Kind(match[1])
    except ValueError:
        raise StreamError(f"{where}: unknown frame kind {match[1]!r}") from None
    return Header(kind, int(match[2], 16), int(match[3], 16))
