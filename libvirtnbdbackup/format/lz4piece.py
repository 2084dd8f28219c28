"""Decompress one LZ4 piece of a data file, a slice at a time, checked.

A piece is one LZ4 frame (stream-format.md): at most 32 MiB of disk bytes,
stored as a few bytes or many MiB. It is read ``slice`` bytes at a time and
handed out in slices of at most ``slice`` decompressed bytes, so neither
side is ever held whole. The frame must hold exactly the bytes the index or
trailer says, and nothing after them.

liblz4 (format/lz4native.py) decompresses into the slice buffers. With
``check`` it verifies each block's and the frame's xxHash before the bytes
count; without, the caller vouches for the stored bytes another way (a
restore sums each of them into the file's Adler-32, compared before the
image is committed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Protocol

from ..errors import StreamError
from .lz4native import FrameDecoder
from .reader import lz4_content_size

SLICE = 1024 * 1024
_HEADER = 19  # the longest LZ4 frame header


class Summing(Protocol):
    def add(self, offset: int, data: bytes | memoryview) -> None: ...


def decompressed_slices(
    fd: int,
    position: int,
    stored: int,
    length: int,
    where: str,
    slice_size: int = SLICE,
    ledger: Summing | None = None,
    check: bool = True,
    allocate: Callable[[int], memoryview] | None = None,
) -> Iterator[memoryview]:
    """The ``length`` disk bytes of the piece stored in ``stored`` bytes at
    file offset ``position`` of ``fd``; ``where`` names it in errors.
    ``ledger`` gets each stored range read (its checksum, format/checked.py).
    Each slice is a view of one buffer, valid until the next slice is asked
    for; with ``allocate`` (a size: a writable buffer of it), each slice has
    a buffer of its own from there."""
    damaged = StreamError(
        f"{where}: compressed piece does not hold the {length} bytes of its extent "
        "(the data is damaged)"
    )
    decoder = FrameDecoder()
    source = memoryview(bytearray(max(1, min(slice_size, stored))))
    shared = memoryview(bytearray(max(1, min(slice_size, length + 1)))) if not allocate else None

    def next_buffer(total: int) -> memoryview:
        if shared is not None:
            return shared
        assert allocate is not None
        # One byte more than the piece has left: bytes beyond its length show.
        return allocate(max(1, min(slice_size, length - total + 1)))

    pos, end = position, position + stored
    pending = source[:0]
    out, filled, total = next_buffer(0), 0, 0
    eof = False
    while not eof:
        if not pending and pos < end:
            got = os.preadv(fd, [source[: min(len(source), end - pos)]], pos)
            if got <= 0:
                raise StreamError(
                    f"{where}: file ends inside compressed data (the file is truncated)"
                )
            pending = source[:got]
            if ledger is not None:
                ledger.add(pos, pending)
            if pos == position and lz4_content_size(bytes(pending[:_HEADER]), where) != length:
                raise damaged
            pos += got
        try:
            used, made, eof = decoder.decode(pending, out[filled:], check)
        except ValueError as err:
            raise StreamError(f"{where}: compressed data is damaged: {err}") from None
        pending = pending[used:]
        filled += made
        total += made
        if total > length:
            raise damaged
        if filled == len(out) or (eof and filled):
            yield out[:filled]
            out, filled = next_buffer(total), 0
        elif not used and not made and not eof and (pending or pos >= end):
            raise damaged  # no progress: the frame goes on past its stored bytes
    if total != length or pending or pos != end:
        raise damaged
