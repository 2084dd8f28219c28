"""Decompress one LZ4 piece of a data file, a slice at a time, checked.

A piece is one LZ4 frame (stream-format.md): at most 32 MiB of disk bytes,
stored as a few bytes or many MiB. It is read ``slice`` bytes at a time and
handed out in slices of at most ``slice`` decompressed bytes, as lz4 makes
them (joining them into even slices cost more than it saved), so neither
side is ever held whole. lz4 checks each block's checksum before it
outputs the block's bytes, and the content checksum at the end; here the
frame must hold exactly the bytes the index or trailer says, and nothing
after them.

lz4's own ``LZ4FrameDecompressor`` copies the input it has not used yet on
every call, which for well-compressed data means copying the same input
again and again; the low-level calls used here take a view instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

import lz4.frame

from ..errors import StreamError
from .reader import lz4_content_size

SLICE = 1024 * 1024


class Summing(Protocol):
    def add(self, offset: int, data: bytes) -> None: ...


def decompressed_slices(
    fd: int,
    position: int,
    stored: int,
    length: int,
    where: str,
    slice_size: int = SLICE,
    ledger: Summing | None = None,
) -> Iterator[bytes]:
    """The ``length`` disk bytes of the piece stored in ``stored`` bytes at
    file offset ``position`` of ``fd``; ``where`` names it in errors.
    ``ledger`` gets each stored range read (its checksum, format/checked.py)."""
    damaged = StreamError(
        f"{where}: compressed piece does not hold the {length} bytes of its extent "
        "(the data is damaged)"
    )
    context = lz4.frame.create_decompression_context()
    pos, end = position, position + stored
    view = memoryview(b"")
    total = 0
    eof = False
    while not eof:
        if not view and pos < end:
            data = os.pread(fd, min(slice_size, end - pos), pos)
            if not data:
                raise StreamError(
                    f"{where}: file ends inside compressed data (the file is truncated)"
                )
            if ledger is not None:
                ledger.add(pos, data)
            if pos == position and lz4_content_size(data, where) != length:
                raise damaged
            pos += len(data)
            view = memoryview(data)
        try:
            out, used, eof = lz4.frame.decompress_chunk(context, view, max_length=slice_size)
        except RuntimeError as err:
            raise StreamError(f"{where}: compressed data is damaged: {err}") from None
        view = view[used:]
        if out:
            total += len(out)
            if total > length:
                raise damaged
            yield out
        elif not used and (view or pos >= end):
            raise damaged  # no progress: the frame goes on past its stored bytes
    if total != length or view or pos != end:
        raise damaged
