"""Back up one disk from its NBD export into a data file."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from tqdm import tqdm

from ..adapters.nbdclient import (
    ALLOCATION_CONTEXT,
    DIRTY,
    STATE_HOLE,
    Extent,
    NbdClient,
    bitmap_context,
)
from ..adapters.readahead import read_ahead
from ..errors import Interrupted, NbdError, TargetError
from ..format.index import FileIndex, index_path
from ..format.meta import StreamMeta
from ..format.writer import StreamWriter, piece_lengths
from ..format.zeros import zeros_of_index, zeros_path
from ..targets.base import DataSink, Writable
from .compresslanes import CompressionLanes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """A run of the disk that is all data or all zero."""

    offset: int
    length: int
    data: bool


@dataclass(frozen=True)
class DiskPlan:
    """What to write for one disk, decided before any data moves."""

    target: str  # disk name, e.g. vda
    file_name: str
    raw_output: bool
    disk_format: str
    checkpoint_name: str
    parent_checkpoint: str
    incremental: bool
    compress: int | None
    bitmap: str | None = None  # dirty bitmap export selecting changed blocks
    sparse: bool = True  # skip reading changed blocks that are now unallocated


@dataclass(frozen=True)
class DiskResult:
    target: str
    file_name: str
    virtual_size: int
    data_size: int
    written: int
    seconds: float


def allocation_regions(extents: list[Extent]) -> list[Region]:
    """Merge base:allocation extents into maximal data and zero runs.

    Flags 0 (allocated) and 2 (zero but allocated) are data; 1 (hole) and
    3 (hole and zero) are zero.
    """
    return _merge([Region(e.offset, e.length, not e.flags & STATE_HOLE) for e in extents])


def changed_regions(dirty: list[Extent], allocation: list[Extent], *, sparse: bool) -> list[Region]:
    """What an incremental backup writes: the blocks dirty since the parent.

    Without sparse detection every dirty range is data. With it, dirty
    ranges are cut along the allocation map: allocated parts are data,
    parts now unallocated (trimmed) are zero ranges, which cost no read and
    no space yet keep a restore bit-identical where the parent held data.
    The file holds data frames only (as the format says of incremental
    files); the zero ranges go to its ``.zeros`` side file.
    """
    changed = [e for e in dirty if e.flags & DIRTY]
    if not sparse:
        return _merge([Region(e.offset, e.length, True) for e in changed])
    alloc = allocation_regions(allocation)
    regions: list[Region] = []
    i = 0
    for ext in changed:
        start, end = ext.offset, ext.offset + ext.length
        while i < len(alloc) and alloc[i].offset + alloc[i].length <= start:
            i += 1
        j = i
        while start < end and j < len(alloc):
            part_end = min(end, alloc[j].offset + alloc[j].length)
            if part_end > start:
                regions.append(Region(start, part_end - start, alloc[j].data))
                start = part_end
            j += 1
    return _merge(regions)


def _merge(regions: list[Region]) -> list[Region]:
    merged: list[Region] = []
    for r in regions:
        last = merged[-1] if merged else None
        if last and last.data == r.data and last.offset + last.length == r.offset:
            merged[-1] = Region(last.offset, last.length + r.length, r.data)
        else:
            merged.append(r)
    return merged


class DiskBackup:
    def __init__(
        self,
        client: NbdClient,
        plan: DiskPlan,
        target: Writable,
        *,
        cancel: threading.Event,
        progress: bool,
        position: int = 0,
        connect: Callable[[], NbdClient] | None = None,
        lanes: int = 1,
        extents: Callable[[str], list[Extent]] | None = None,
    ) -> None:
        """``connect`` opens another connection to the same export: with
        compression, each of ``lanes`` threads reads and compresses over
        its own. ``extents`` reads a meta context's map (default: block
        status over ``client``; ``-q`` passes nbdinfo's)."""
        self.client = client
        self.plan = plan
        self.target = target
        self.cancel = cancel
        self.progress = progress
        self.position = position
        self.connect = connect
        self.lanes = lanes if connect is not None else 1
        self.extents = extents or client.extents

    def regions(self) -> list[Region]:
        """What this disk's data file holds: data and zero runs in disk order."""
        allocation = self.extents(ALLOCATION_CONTEXT)
        if self.plan.bitmap:
            dirty = self.extents(bitmap_context(self.plan.bitmap))
            return changed_regions(dirty, allocation, sparse=self.plan.sparse)
        return allocation_regions(allocation)

    def run(self) -> DiskResult:
        started = time.monotonic()
        regions = self.regions()
        data_size = sum(r.length for r in regions if r.data)
        log.info(
            "disk %s: %d bytes virtual, %d bytes of data in %d data extents",
            self.plan.target,
            self.client.size,
            data_size,
            sum(1 for r in regions if r.data),
        )
        with tqdm(
            total=data_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self.plan.target,
            position=self.position,
            leave=True,
            disable=not self.progress,
        ) as bar:
            sink = self.target.open_data(self.plan.file_name)
            chunks = self._chunks(regions, bar)
            try:
                index = None
                if self.plan.raw_output:
                    written = self._write_raw(sink.file, regions, chunks)
                    checksum = None
                else:
                    written, checksum, index = self._write_stream(
                        sink.file, regions, data_size, chunks, bar
                    )
                sink.commit()
            except OSError as err:
                sink.abort()
                raise TargetError(_write_failure(sink, err)) from None
            except BaseException:
                sink.abort()
                raise
            finally:
                # Now, not when the exception is collected (at interpreter
                # exit, after the connection is gone): reads in flight end
                # while their handle is still open.
                chunks.close()
        if checksum is not None:
            self.target.write(f"{self.plan.file_name}.chksum", str(checksum).encode())
        if index is not None:
            if self.plan.incremental:
                # Every incremental file gets one, also an empty one: a missing
                # side file then tells that something was lost.
                self.target.write(zeros_path(self.plan.file_name), zeros_of_index(index))
            self.target.write(index_path(self.plan.file_name), index.to_bytes())
        seconds = time.monotonic() - started
        log.info(
            "disk %s: saved %s (%.1f MiB of data in %.2f s, %.1f MiB/s)",
            self.plan.target,
            self.plan.file_name,
            data_size / 2**20,
            seconds,
            data_size / 2**20 / max(seconds, 1e-6),
        )
        return DiskResult(
            self.plan.target, self.plan.file_name, self.client.size, data_size, written, seconds
        )

    def _chunks(
        self, regions: list[Region], bar: tqdm
    ) -> Generator[tuple[int, memoryview], None, None]:
        ranges = [(r.offset, r.length) for r in regions if r.data]
        # On a thread of its own: the reads go on while this one writes.
        reads = read_ahead(self.client, ranges, name=f"read-{self.plan.target}")
        try:
            for offset, data in reads:
                if self.cancel.is_set():
                    raise Interrupted(f"backup of disk {self.plan.target} interrupted")
                bar.update(len(data))
                yield offset, data
        finally:
            reads.close()

    def _write_stream(
        self,
        fh: BinaryIO,
        regions: list[Region],
        data_size: int,
        chunks: Iterator[tuple[int, memoryview]],
        bar: tqdm,
    ) -> tuple[int, int, FileIndex]:
        meta = StreamMeta(
            virtual_size=self.client.size,
            data_size=data_size,
            disk_name=self.plan.target,
            disk_format=self.plan.disk_format,
            checkpoint_name=self.plan.checkpoint_name,
            parent_checkpoint=self.plan.parent_checkpoint,
            incremental=self.plan.incremental,
            compressed=False if self.plan.compress is None else self.plan.compress,
        )
        writer = StreamWriter(fh, meta, max_piece=self.client.max_request)
        if self.plan.compress is not None and self.lanes > 1:
            self._write_compressed(writer, regions, bar)
        else:
            for region in regions:
                if region.data:
                    writer.data(region.offset, region.length, _take(chunks, region))
                else:
                    writer.zero(region.offset, region.length)
        checksum = writer.finish()
        return writer.bytes_written, checksum, writer.index(self.plan.file_name)

    def _write_compressed(self, writer: StreamWriter, regions: list[Region], bar: tqdm) -> None:
        """Compress on several lanes (``compresslanes``); write the pieces in order."""
        assert self.plan.compress is not None and self.connect is not None
        lock = threading.Lock()

        def progress(count: int) -> None:
            with lock:
                bar.update(count)

        max_piece = self.client.max_request
        with CompressionLanes(
            self.connect,
            [(r.offset, r.length) for r in regions if r.data],
            max_piece=max_piece,
            level=self.plan.compress,
            lanes=self.lanes,
            progress=progress,
            cancel=self.cancel,
            disk=self.plan.target,
        ) as lanes:
            for region in regions:
                if region.data:
                    count = len(piece_lengths(region.length, max_piece))
                    pieces = (lanes.next_piece() for _ in range(count))
                    writer.packed(region.offset, region.length, pieces)
                else:
                    writer.zero(region.offset, region.length)

    def _write_raw(
        self, fh: BinaryIO, regions: list[Region], chunks: Iterator[tuple[int, memoryview]]
    ) -> int:
        """A full-size sparse image: data where the disk has data, holes elsewhere."""
        written = 0
        try:
            for offset, data in chunks:
                if fh.tell() != offset:
                    fh.seek(offset)
                fh.write(data)
                written += len(data)
            fh.truncate(self.client.size)
        except OSError as err:
            raise TargetError(f"cannot write {self.plan.file_name}: {err.strerror}") from None
        return written


def _write_failure(sink: DataSink, err: OSError) -> str:
    where = getattr(sink, "partial", None) or sink.name
    message = f"cannot write {where}: {err.strerror or err}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        message += " (the backup target is full: free space or choose another folder)"
    return message


def _take(chunks: Iterator[tuple[int, memoryview]], region: Region) -> Iterator[memoryview]:
    """The chunks that make up ``region``, from the shared read pipeline."""
    end = region.offset + region.length
    pos = region.offset
    while pos < end:
        try:
            offset, data = next(chunks)
        except StopIteration:
            raise NbdError(f"reads ended at offset {pos}, inside extent ending at {end}") from None
        assert offset == pos, (offset, pos)
        pos += len(data)
        yield data
