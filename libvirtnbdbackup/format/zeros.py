"""Ranges an incremental data file leaves to zero, in a side file ``<datafile>.zeros``.

The stream format allows only ``data`` frames in inc and diff files, and
virtnbdbackup 2.x's map copies whatever bytes lie in the file over any
other frame. Yet a range the guest discarded since the parent backup must
read as zeros after a restore, or the older data shows through. So the
backup writes such ranges here, as JSON; our restore and virtnbdmap merge
them into the file's extents as zero extents (layered like a ``zero``
frame), and an older reader, which ignores the file, restores the chain as
its own backups would.

The side file names its data file's size and fingerprint (as the ``.idx``
does): one that does not match its data file is an error, never applied.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ..errors import StreamError

log = logging.getLogger(__name__)

ZEROS_SUFFIX = ".zeros"
ZEROS_FORMAT = "virtnbdbackup-zero-ranges"
ZEROS_VERSION = 1

Range = tuple[int, int]  # (offset on the disk, length)


def zeros_path(data_path: str) -> str:
    return data_path + ZEROS_SUFFIX


def zeros_bytes(data_file: str, file_size: int, fingerprint: str, ranges: list[Range]) -> bytes:
    doc = {
        "format": ZEROS_FORMAT,
        "version": ZEROS_VERSION,
        "dataFile": data_file,
        "fileSize": file_size,
        "fingerprint": fingerprint,
        "zeros": [[start, length] for start, length in ranges],
    }
    return json.dumps(doc).encode()


def zeros_of_index(index: Any) -> bytes:
    """The side file of an incremental data file, from the index its writer made."""
    ranges = [(e.start, e.length) for e in index.extents if e.is_zero]
    return zeros_bytes(index.data_file, index.file_size, index.fingerprint, ranges)


def load_zeros(data_path: str, file_size: int, fingerprint: str) -> list[Range] | None:
    """The zero ranges recorded for a data file; None when it has no side file."""
    path = zeros_path(data_path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StreamError(f"cannot read {path}: {err.strerror}") from None
    try:
        doc: Any = json.loads(raw)
        if doc.get("format") != ZEROS_FORMAT or int(doc.get("version", 0)) != ZEROS_VERSION:
            raise ValueError("not a zero-ranges file of a known version")
        ranges = [(int(a), int(b)) for a, b in doc["zeros"]]
        size, mark = int(doc["fileSize"]), str(doc["fingerprint"])
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise StreamError(
            f"{path} is damaged ({err}): the ranges the guest discarded "
            "are unknown, so the chain cannot be restored bit for bit"
        ) from None
    if size != file_size or mark != fingerprint:
        raise StreamError(
            f"{path} does not belong to {os.path.basename(data_path)} as it is now (size or "
            "fingerprint differ): the data file was changed or replaced after the backup"
        )
    last = 0
    for start, length in ranges:
        if start < last or length <= 0:
            raise StreamError(f"{path}: range {start}+{length} is out of order or empty")
        last = start + length
    return ranges
