"""The extent index of a data file, kept in a side file ``<datafile>.idx``.

It lists every ``data`` and ``zero`` frame with the file offset of its
payload (and, compressed, the packed and unpacked size of each LZ4 piece),
so a data file can be served at random offsets without walking its frames.
The backup writes it next to the data file; a reader that finds it missing
or stale rebuilds it by seeking from frame header to frame header, never
reading a payload. Older readers ignore it: it is not a ``.data`` file.

An index is bound to its data file: it names the file, holds its size, a
fingerprint of its first and last 64 KiB (meta JSON with its timestamp,
and the trailer) and, when the writer knew it, its Adler-32 (compared with
the ``.chksum`` file), and ends with a BLAKE2b digest of all of that and
of the extents. One that does not match in any of these, or whose extents
do not fit the file, is rejected and rebuilt from the frame headers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import lz4.frame

from ..errors import StreamError, TargetError
from ..targets.directory import write_atomic
from . import frames
from .frames import HEADER_SIZE, TERMINATOR, Kind
from .reader import StreamReader
from .zeros import ZEROS_SUFFIX, load_zeros

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "virtnbdbackup-extent-index"
# 1: without digest and dataChecksum (rebuilt when found); 2: without the
# Adler-32 of each LZ4 piece (read as it is, the pieces then unsummed).
INDEX_VERSION = 3
READ_VERSIONS = (2, 3)
SUM_UNIT = 1024 * 1024  # an uncompressed payload is summed in parts of this size
FINGERPRINT_SPAN = 64 * 1024
_LZ4_MAGIC = 0x184D2204
_LZ4_CONTENT_SIZE_FLAG = 0x08


@dataclass(frozen=True)
class Extent:
    start: int  # offset on the disk
    length: int
    offset: int  # payload offset in the data file; -1 for a zero frame
    pieces: tuple[tuple[int, int], ...] = ()  # compressed: (packed, unpacked) sizes
    # When the writer knew them: compressed, the Adler-32 of each piece's
    # stored bytes (checked instead of the frames' slower xxHash); not, of
    # each SUM_UNIT of the payload. Not part of the layout, so an index
    # rebuilt from the headers (it has none) compares equal.
    sums: tuple[int, ...] = field(default=(), compare=False)

    @property
    def is_zero(self) -> bool:
        return self.offset < 0

    def to_json(self) -> list[Any]:
        if self.is_zero:
            return [self.start, self.length]
        if not self.pieces and not self.sums:
            return [self.start, self.length, self.offset]
        item = [self.start, self.length, self.offset, [list(p) for p in self.pieces]]
        if self.sums:
            item.append(list(self.sums))
        return item

    @classmethod
    def from_json(cls, item: list[Any]) -> Extent:
        if len(item) == 2:
            return cls(int(item[0]), int(item[1]), -1)
        pieces = tuple((int(p), int(u)) for p, u in item[3]) if len(item) > 3 else ()
        sums = tuple(int(v) for v in item[4]) if len(item) > 4 else ()
        return cls(int(item[0]), int(item[1]), int(item[2]), pieces, sums)


@dataclass(frozen=True)
class FileIndex:
    data_file: str  # base name of the data file
    file_size: int
    fingerprint: str
    virtual_size: int
    compressed: bool
    extents: list[Extent]
    # Adler-32 of the whole data file, when known; not part of what the index says.
    data_checksum: int | None = field(default=None, compare=False)
    version: int = field(default=INDEX_VERSION, compare=False)  # as read, for its digest

    def _doc(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "version": self.version,
            "dataFile": self.data_file,
            "fileSize": self.file_size,
            "fingerprint": self.fingerprint,
            "dataChecksum": self.data_checksum,
            "virtualSize": self.virtual_size,
            "compressed": self.compressed,
            "extents": [e.to_json() for e in self.extents],
        }

    def to_bytes(self) -> bytes:
        doc = self._doc()
        doc["digest"] = _digest(doc)
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> FileIndex:
        try:
            doc = json.loads(raw)
            if doc.get("format") != INDEX_FORMAT or doc.get("version") not in READ_VERSIONS:
                raise ValueError("unknown index format or version")
            checksum = doc["dataChecksum"]
            index = cls(
                data_file=str(doc["dataFile"]),
                file_size=int(doc["fileSize"]),
                fingerprint=str(doc["fingerprint"]),
                virtual_size=int(doc["virtualSize"]),
                compressed=bool(doc["compressed"]),
                extents=[Extent.from_json(e) for e in doc["extents"]],
                data_checksum=None if checksum is None else int(checksum),
                version=int(doc["version"]),
            )
            if doc["digest"] != _digest(index._doc()):
                raise ValueError("its digest does not match its content (it was changed)")
            index.check_extents()
            return index
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise StreamError(f"{where}: index is damaged: {err}") from None

    def check_extents(self) -> None:
        """Extents in disk order, inside the disk, payloads inside the file."""
        end = 0
        for e in self.extents:
            if e.start < end or e.length <= 0 or e.start + e.length > self.virtual_size:
                raise ValueError(f"extent {e.start}+{e.length} is out of order or out of the disk")
            end = e.start + e.length
            stored = sum(p for p, _u in e.pieces) if e.pieces else e.length
            units = len(e.pieces) if e.pieces else -(-e.length // SUM_UNIT)
            if e.sums and len(e.sums) != units:
                raise ValueError(f"extent {e.start}+{e.length}: not one checksum per piece")
            if not e.is_zero and not HEADER_SIZE <= e.offset <= self.file_size - stored:
                raise ValueError(f"extent {e.start}+{e.length} points outside the data file")


def _digest(doc: dict[str, Any]) -> str:
    body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.blake2b(body, digest_size=32).hexdigest()


def fingerprint_of(head: bytes, tail: bytes) -> str:
    """Fingerprint of a file from its first and last ``FINGERPRINT_SPAN`` bytes."""
    return hashlib.blake2b(head + b"\0" + tail, digest_size=16).hexdigest()


def file_fingerprint(fh: BinaryIO, size: int) -> str:
    head = os.pread(fh.fileno(), min(size, FINGERPRINT_SPAN), 0)
    tail_start = max(0, size - FINGERPRINT_SPAN)
    tail = os.pread(fh.fileno(), size - tail_start, tail_start)
    return fingerprint_of(head, tail)


def index_path(data_path: str) -> str:
    return data_path + INDEX_SUFFIX


def build_index(fh: BinaryIO, name: str) -> FileIndex:
    """Walk the frame headers of a data file (payloads are skipped, not read)."""
    reader = StreamReader(fh, name)
    meta = reader.meta
    trailer = list(reader.trailer)
    size = fh.seek(0, os.SEEK_END)
    pos = reader.position
    extents: list[Extent] = []
    data_size = 0
    next_start = 0
    while True:
        fh.seek(pos)
        header = frames.decode(fh.read(HEADER_SIZE), f"{name} at offset {pos}")
        if header.kind is Kind.STOP:
            break
        if header.kind not in (Kind.DATA, Kind.ZERO):
            raise StreamError(f"{name} at offset {pos}: unexpected {header.kind.value.decode()}")
        if header.start < next_start or header.start + header.length > meta.virtual_size:
            raise StreamError(
                f"{name} at offset {pos}: extent {header.start}+{header.length} is out of "
                f"order or beyond the disk size {meta.virtual_size}"
            )
        next_start = header.start + header.length
        pos += HEADER_SIZE
        if header.kind is Kind.ZERO:
            extents.append(Extent(header.start, header.length, -1))
            continue
        data_size += header.length
        pieces: tuple[tuple[int, int], ...] = ()
        stored = header.length
        if meta.is_compressed:
            if not trailer:
                raise StreamError(f"{name} at offset {pos}: more data frames than trailer entries")
            entry = trailer.pop(0)
            sizes = [entry] if isinstance(entry, int) else next(iter(entry.values()))
            pieces = _piece_sizes(fh, name, pos, sizes, header.length)
            stored = sum(sizes)
        extents.append(Extent(header.start, header.length, pos, pieces))
        pos += stored
        fh.seek(pos)
        if fh.read(2) != TERMINATOR:
            raise StreamError(
                f"{name} at offset {pos}: expected CR LF after the frame payload "
                "(the file is damaged or truncated)"
            )
        pos += 2
    if data_size != meta.data_size:
        raise StreamError(
            f"{name}: data frames hold {data_size} bytes but the meta frame says "
            f"dataSize {meta.data_size}"
        )
    fingerprint = file_fingerprint(fh, size)
    if meta.incremental:
        extents = _with_side_zeros(name, size, fingerprint, extents)
    return FileIndex(
        data_file=os.path.basename(name),
        file_size=size,
        fingerprint=fingerprint,
        virtual_size=meta.virtual_size,
        compressed=meta.is_compressed,
        extents=extents,
        data_checksum=saved_checksum(name),
    )


def _with_side_zeros(name: str, size: int, fingerprint: str, extents: list[Extent]) -> list[Extent]:
    """An incremental file's extents with the zero ranges of its ``.zeros`` side file."""
    ranges = load_zeros(name, size, fingerprint)
    if ranges is None:
        log.warning(
            "%s has no %s side file: ranges the guest discarded since the parent backup, if "
            "any, keep their older data, as a virtnbdbackup 2.x restore leaves them",
            os.path.basename(name),
            ZEROS_SUFFIX,
        )
        return extents
    merged = sorted(
        [*extents, *(Extent(start, length, -1) for start, length in ranges)], key=lambda e: e.start
    )
    for before, after in itertools.pairwise(merged):
        if before.start + before.length > after.start:
            raise StreamError(
                f"{name}{ZEROS_SUFFIX}: a zero range overlaps a data frame of its data file "
                f"at offset {after.start}"
            )
    return merged


def _piece_sizes(
    fh: BinaryIO, name: str, pos: int, sizes: list[int], length: int
) -> tuple[tuple[int, int], ...]:
    """(packed, unpacked) per piece; the unpacked size comes from each LZ4 frame header."""
    if len(sizes) == 1:
        return ((sizes[0], length),)
    pieces = []
    offset = pos
    for packed in sizes:
        pieces.append((packed, _lz4_content_size(fh, name, offset, packed)))
        offset += packed
    if sum(u for _p, u in pieces) != length:
        raise StreamError(
            f"{name} at offset {pos}: compressed pieces hold {sum(u for _p, u in pieces)} "
            f"bytes, the frame header says {length}"
        )
    return tuple(pieces)


def _lz4_content_size(fh: BinaryIO, name: str, offset: int, packed: int) -> int:
    fh.seek(offset)
    head = fh.read(14)
    if len(head) < 6 or struct.unpack_from("<I", head)[0] != _LZ4_MAGIC:
        raise StreamError(f"{name} at offset {offset}: not an LZ4 frame")
    if head[4] & _LZ4_CONTENT_SIZE_FLAG and len(head) == 14:
        return int(struct.unpack_from("<Q", head, 6)[0])
    # A writer that did not store the content size: decompress to learn it.
    fh.seek(offset)
    try:
        return len(lz4.frame.decompress(fh.read(packed)))
    except RuntimeError as err:
        raise StreamError(f"{name} at offset {offset}: compressed data is damaged: {err}") from None


def saved_checksum(path: str) -> int | None:
    """The Adler-32 in ``<datafile>.chksum``; None when there is none (or it is damaged)."""
    try:
        with open(path + ".chksum", "rb") as fh:
            return int(fh.read(32).strip())
    except (OSError, ValueError):
        return None


def load_index(path: str, fh: BinaryIO) -> FileIndex | None:
    """The side-file index of the open data file ``fh``, or None if missing,
    stale or not bound to it (see the module's docstring)."""
    try:
        with open(index_path(path), "rb") as side:
            raw = side.read()
    except FileNotFoundError:
        return None
    try:
        index = FileIndex.from_bytes(raw, index_path(path))
    except StreamError as err:
        if b'"version":1,' in raw[:80]:
            log.info("%s is of an older version; rebuilding it", index_path(path))
        else:
            log.warning("%s; rebuilding it", err)
        return None
    size = os.fstat(fh.fileno()).st_size
    checksum = saved_checksum(path)
    if (
        index.data_file != os.path.basename(path)
        or index.file_size != size
        or index.fingerprint != file_fingerprint(fh, size)
        or (None not in (checksum, index.data_checksum) and checksum != index.data_checksum)
    ):
        log.warning("%s does not match its data file; rebuilding it", index_path(path))
        return None
    return index


def open_index(path: str, fh: BinaryIO) -> FileIndex:
    """The index of a data file: from its side file, or rebuilt (and saved if possible)."""
    index = load_index(path, fh)
    if index is not None:
        return index
    index = build_index(fh, path)
    try:
        write_atomic(Path(index_path(path)), index.to_bytes())
    except TargetError as err:
        log.info("index not saved (%s); it is rebuilt on each open", err)
    return index
