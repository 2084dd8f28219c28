"""The backup's reader thread (adapters/readahead.py) against real NBD servers:
the data file is the stream the format writer makes of the source's bytes,
and every way out (a failed read, a full target, a stop) is one error with
no thread, no ``.partial`` and no buffer left behind."""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import nbd
import pytest

from libvirtnbdbackup.adapters import qemu
from libvirtnbdbackup.adapters.nbdclient import ALLOCATION_CONTEXT, BUFFERS, NbdClient
from libvirtnbdbackup.adapters.readahead import read_ahead
from libvirtnbdbackup.errors import Interrupted, NbdError, TargetError
from libvirtnbdbackup.format.frames import HEADER_SIZE
from libvirtnbdbackup.format.index import index_path
from libvirtnbdbackup.format.writer import StreamWriter
from libvirtnbdbackup.jobs.diskbackup import DiskBackup, DiskPlan, allocation_regions
from libvirtnbdbackup.targets.directory import DirectoryTarget
from tests.unit.samples import sample_meta

from .vmlab import MiB, small_filesystem

READER = "read-vda"


def plan(*, raw: bool = False) -> DiskPlan:
    return DiskPlan(
        target="vda",
        file_name="vda.copy.data",
        raw_output=raw,
        disk_format="raw",
        checkpoint_name="",
        parent_checkpoint="",
        incremental=False,
        compress=None,
    )


def backup(client: NbdClient, out: Path, cancel: threading.Event | None = None) -> None:
    DiskBackup(
        client, plan(), DirectoryTarget(out), cancel=cancel or threading.Event(), progress=False
    ).run()


@contextmanager
def nbdkit(*args: str) -> Iterator[NbdClient]:
    """An nbdkit on a private pipe (``-s``), through libnbd's connect_command."""
    handle = nbd.NBD()
    handle.add_meta_context(ALLOCATION_CONTEXT)
    handle.connect_command(["nbdkit", "-s", "--exit-with-parent", *args])
    client = NbdClient(handle, "nbdkit")
    try:
        yield client
    finally:
        client.close()


def free_buffers() -> int:
    return sum(len(free) for free in BUFFERS._free.values())


def assert_clean_end(out: Path) -> None:
    assert not [t for t in threading.enumerate() if t.name == READER]
    assert not list(out.glob("*.partial"))
    assert not (out / "vda.copy.data").exists()


def scattered_image(path: Path, seed: int) -> None:
    """A raw image of 48 MiB with data runs of odd lengths and sizes, some
    far larger than one read, some smaller, between holes."""
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        os.truncate(fh.fileno(), 48 * MiB)
        offset = 0
        while offset < 46 * MiB:
            offset += rng.choice((0, 4096, 65536, 3 * MiB)) + 4096 * rng.randrange(8)
            length = 4096 * rng.randrange(1, 1200)
            os.pwrite(fh.fileno(), rng.randbytes(length), offset)
            offset += length


def test_the_data_file_is_the_writers_stream_of_the_source(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    scattered_image(image, 15)
    with qemu.nbd_server(str(image), "raw", readonly=True) as address:
        client = NbdClient.connect(address, contexts=[ALLOCATION_CONTEXT], wait=10)
        try:
            regions = allocation_regions(client.extents())
            backup(client, tmp_path / "out")
        finally:
            client.close()
    assert sum(r.data for r in regions) > 10  # many data runs, many reads each
    # The same stream written in one thread from the image file itself.
    source = image.read_bytes()
    out = tmp_path / "out"
    written = (out / "vda.copy.data").read_bytes()
    date = json.loads(written[HEADER_SIZE : written.index(b"\n}") + 2])["date"]
    expected = BytesIO()
    meta = sample_meta(
        virtual_size=len(source),
        data_size=sum(r.length for r in regions if r.data),
        disk_format="raw",
        checkpoint_name="",
        date=date,
    )
    writer = StreamWriter(expected, meta, max_piece=client.max_request)
    for r in regions:
        if r.data:
            end = r.offset + r.length
            chunks = (source[at : min(at + MiB, end)] for at in range(r.offset, end, MiB))
            writer.data(r.offset, r.length, chunks)
        else:
            writer.zero(r.offset, r.length)
    checksum = writer.finish()
    assert written == expected.getvalue()
    assert (out / "vda.copy.data.chksum").read_text() == str(checksum)
    index = (out / index_path("vda.copy.data")).read_bytes()
    assert index == writer.index("vda.copy.data").to_bytes()
    assert not [t for t in threading.enumerate() if t.name == READER]


def test_a_raw_backup_is_the_source_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    scattered_image(image, 16)
    out = tmp_path / "out"
    with qemu.nbd_server(str(image), "raw", readonly=True) as address:
        client = NbdClient.connect(address, contexts=[ALLOCATION_CONTEXT], wait=10)
        try:
            DiskBackup(
                client,
                plan(raw=True),
                DirectoryTarget(out),
                cancel=threading.Event(),
                progress=False,
            ).run()
        finally:
            client.close()
    assert (out / "vda.copy.data").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("rate", ["1", "5%"], ids=["first-read", "some-read"])
def test_a_failed_read_is_one_error_and_leaves_nothing(tmp_path: Path, rate: str) -> None:
    """Reads fail in the reader thread: at once (the whole first window of
    reads in flight fails), or at a random later one."""
    out = tmp_path / "out"
    before = free_buffers()
    failing = nbdkit("--filter=error", "pattern", "64M", f"error-pread-rate={rate}")
    with failing as client, pytest.raises(NbdError, match=r"nbdkit: read at offset \d+ failed: "):
        backup(client, out)
    assert_clean_end(out)
    # Every buffer of the reads that ended came back (a failed one may not).
    assert free_buffers() >= before - 1


def test_a_full_target_stops_the_reader(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "fs", 8) as fs, nbdkit("pattern", "64M") as client:
        out = fs / "out"
        with pytest.raises(TargetError, match="the backup target is full"):
            backup(client, out)
        assert_clean_end(out)


def test_a_stop_ends_the_reader_thread(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    out = tmp_path / "out"
    with nbdkit("pattern", "64M") as client, pytest.raises(Interrupted):
        backup(client, out, cancel)
    assert_clean_end(out)


def test_closing_while_the_reader_waits_on_a_full_queue(tmp_path: Path) -> None:
    depth, ahead = 2, 2
    queue_full = threading.Event()

    def ranges() -> Iterator[tuple[int, int]]:
        # When the reader takes range n, it has handed over reads 0 to n - depth - 1.
        for n in range(128):
            if n == depth + ahead + 1:
                queue_full.set()  # ahead + 1 handed over, one taken: the queue is full
            yield n * 512 * 1024, 512 * 1024

    with nbdkit("pattern", "64M") as client:
        reads = read_ahead(client, ranges(), depth=depth, ahead=ahead, name=READER)
        assert next(reads)[0] == 0
        assert queue_full.wait(30)
        closer = threading.Thread(target=reads.close)
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "closing hangs on the reader thread"
    assert not [t for t in threading.enumerate() if t.name == READER]
