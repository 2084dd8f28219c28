"""Sample stream pieces shared by the unit tests."""

from __future__ import annotations

import dataclasses
from typing import Any

from libvirtnbdbackup.format.meta import StreamMeta
from libvirtnbdbackup.format.writer import Buffer, compress_pieces

DATE = "2024-05-06T07:08:09.123456"

_FULL = StreamMeta(
    virtual_size=1 << 20,
    data_size=0,
    disk_name="vda",
    disk_format="qcow2",
    checkpoint_name="virtnbdbackup.0",
    parent_checkpoint="",
    incremental=False,
    compressed=False,
    date=DATE,
)


def sample_meta(**changes: Any) -> StreamMeta:
    """The meta of an uncompressed full backup of vda, with ``changes``."""
    return dataclasses.replace(_FULL, **changes)


def compress_piece(data: Buffer, level: int) -> bytes:
    """One LZ4 frame as the writer makes it, joined into one payload."""
    return b"".join(compress_pieces(data, level))
