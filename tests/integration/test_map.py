"""virtnbdmap: a chain served over NBD, as a loop device, and booted as a VM.

The VM's disk holds an MBR partition with a small ext4 file system (made
with ``mkfs.ext4 -d``) and known patterns after it. A chain of a full, a
compressed incremental (with a discard, saved as a zero frame) and an
uncompressed one is mapped and compared with what virtnbdrestore gives.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import nbd
import pytest

from libvirtnbdbackup.adapters.nbdkit import PLUGIN
from libvirtnbdbackup.format.index import SUM_UNIT, FileIndex, build_index, index_path

from .vmlab import (
    BIN,
    LAB_DIR,
    DiskSpec,
    LabVM,
    MiB,
    backup_ok,
    create_vm,
    hmp_io,
    images_identical,
    remove_vm,
    restore_image,
    sh,
)

DISK_SIZE = 64 * MiB
PART_START = 1 * MiB
PART_SIZE = 32 * MiB
SECRET = "the file we want back\n"


@dataclass
class Mapping:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    helpers: dict[int, str] = field(default_factory=dict)  # pid -> nbdkit, nbdfuse

    def value(self, key: str) -> str:
        """The value of the first ``key ...: value`` line virtnbdmap printed."""
        for line in self.lines:
            if line.startswith(key):
                return line.split(": ", 1)[1]
        raise AssertionError(f"no {key!r} line in {self.lines}")


def _mbr(start: int, size: int) -> bytes:
    """A DOS partition table with one Linux partition (LBA addressing)."""
    entry = struct.pack(
        "<B3sB3sII", 0, b"\xff\xff\xff", 0x83, b"\xff\xff\xff", start // 512, size // 512
    )
    return bytes(446) + entry + bytes(48) + b"\x55\xaa"


def make_fs_image(path: Path) -> None:
    """A qcow2 image: partition 1 is ext4 holding secret.txt, patterns after it."""
    tree = path.parent / "fs-tree"
    tree.mkdir()
    (tree / "secret.txt").write_text(SECRET)
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        fh.truncate(DISK_SIZE)
    fs_size = f"{PART_SIZE // 1024}k"
    sh("mkfs.ext4", "-q", "-F", "-d", tree, "-E", f"offset={PART_START}", raw, fs_size)
    with open(raw, "r+b") as fh:
        fh.write(_mbr(PART_START, PART_SIZE))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 40M 2M", path)
    raw.unlink()


@pytest.fixture(scope="module")
def chain(conn: libvirt.virConnect) -> Iterator[tuple[LabVM, Path]]:
    """A VM and its backup folder: full, compressed inc 1 (with a discard), inc 2."""
    vm = create_vm(conn, [DiskSpec("vda", DISK_SIZE)], cdrom=False, start=False)
    try:
        make_fs_image(vm.images["vda"])
        vm.dom.create()
        out = vm.folder / "backup"
        backup_ok(vm, out, "full")
        hmp_io(vm, "vda", "write -P 0x11 44M 1M")
        hmp_io(vm, "vda", "discard 40M 1M")
        backup_ok(vm, out, "inc", "-z")
        hmp_io(vm, "vda", "write -P 0x22 41M 512K")
        backup_ok(vm, out, "inc")
        yield vm, out
    finally:
        remove_vm(vm)


@contextlib.contextmanager
def mapped(*args: str | Path, expect_exit: int = 0) -> Iterator[Mapping]:
    """Run virtnbdmap until it is ready; stop it (SIGTERM) when the block ends."""
    proc = subprocess.Popen(
        [str(BIN / "virtnbdmap"), *[str(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mapping = Mapping(proc)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=120)
            if line is None:
                raise AssertionError(f"virtnbdmap ended: {proc.wait()} {proc.stderr.read()}")  # type: ignore[union-attr]
            mapping.lines.append(line)
            if line.startswith("ready:"):
                break
        mapping.helpers = {p: process_name(p) for p in children(proc.pid)}
        yield mapping
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == expect_exit, proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:  # a failed test: let virtnbdmap clean up, as a user would
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def socket_path(tag: str) -> Path:
    return LAB_DIR / f"map-{tag}-{uuid.uuid4().hex[:6]}.sock"


@pytest.mark.parametrize("until", [None, "virtnbdbackup.0", "virtnbdbackup.1"])
def test_export_equals_the_restored_image(
    chain: tuple[LabVM, Path], tmp_path: Path, until: str | None
) -> None:
    _vm, out = chain
    limit = ["--until", until] if until else []
    expected = restore_image(out, tmp_path / "restored", *limit)
    sock = socket_path("nbdcopy")
    with mapped("-i", out, "--disk", "vda", *limit, "--listen", f"unix:{sock}", "-r") as m:
        uri = m.value("export vda")
        assert uri == f"nbd+unix:///vda?socket={sock}"
        copy = tmp_path / "mapped.raw"
        sh("nbdcopy", uri, copy)
        h = nbd.NBD()
        h.connect_uri(uri)
        with pytest.raises(nbd.Error):  # --readonly refuses writes
            h.pwrite(b"x" * 512, 0)
        h.shutdown()
    assert images_identical(copy, expected)
    assert_no_leftovers(None, m)


def test_backup_writes_the_index_that_the_headers_give(chain: tuple[LabVM, Path]) -> None:
    _vm, out = chain
    files = sorted(out.glob("vda.*.data"))
    assert len(files) == 3
    compressed = []
    for path in files:
        saved = FileIndex.from_bytes(Path(index_path(str(path))).read_bytes(), str(path))
        with open(path, "rb") as fh:
            assert saved == build_index(fh, str(path))
        data = [e for e in saved.extents if not e.is_zero]
        compressed.append(saved.compressed and all(e.pieces for e in data))
    assert compressed.count(True) == 1  # inc 1, taken with -z


def test_file_list_with_writes_to_the_cow_layer(chain: tuple[LabVM, Path], tmp_path: Path) -> None:
    _vm, out = chain
    files = sorted(out.glob("vda.*.data"), key=lambda p: (".inc." in p.name, p.name))
    before = {p: p.stat().st_mtime_ns for p in files}
    side = Path(index_path(str(files[1])))
    side.unlink()  # rebuilt from the frame headers when the chain is opened
    expected = restore_image(out, tmp_path / "restored")
    sock = socket_path("cow")
    with mapped("-f", ",".join(map(str, files)), "--listen", f"unix:{sock}", "-e", "disk") as m:
        uri = m.value("export vda")
        assert uri.startswith("nbd+unix:///disk?")
        copy = tmp_path / "mapped.raw"
        sh("nbdcopy", uri, copy)
        assert images_identical(copy, expected)
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"\x99" * 4096, 41 * MiB)
        assert h.pread(4096, 41 * MiB) == b"\x99" * 4096
        h.shutdown()
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert side.is_file()


def test_ext4_file_read_back_through_the_loop_device(
    chain: tuple[LabVM, Path], tmp_path: Path
) -> None:
    _vm, out = chain
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mapped("-i", out, "-d", "loop", "-r") as m:
        device = m.value("device vda")
        partition = m.value("partition vda")
        assert partition == f"{device}p1"
        sh("mount", "-o", "ro", partition, mnt)
        try:
            assert (mnt / "secret.txt").read_text() == SECRET
        finally:
            sh("umount", mnt)
    assert_no_leftovers(device, m)


def test_boot_reads_the_backed_up_pattern(
    chain: tuple[LabVM, Path], conn: libvirt.virConnect, tmp_path: Path
) -> None:
    vm, out = chain
    overlays = LAB_DIR / f"overlays-{uuid.uuid4().hex[:6]}"
    name = f"{vm.name}-boot"
    with mapped("-i", out, "--boot", "-N", name, "-o", overlays) as m:
        assert m.value("domain").startswith(name)
        dom = conn.lookupByName(name)
        assert dom.isActive() and not dom.isPersistent()
        booted = LabVM(name, dom, {"vda": Path(m.value("overlay vda"))}, overlays)
        assert guest_reads(booted, 0x22, 41 * MiB, 512 * 1024)
        assert guest_reads(booted, 0x11, 44 * MiB, 1 * MiB)
        assert guest_reads(booted, 0x00, 40 * MiB, 1 * MiB)  # discarded after the full
        assert guest_reads(booted, 0xAB, 41 * MiB + 512 * 1024, 512 * 1024)
        assert not guest_reads(booted, 0x22, 48 * MiB, 64 * 1024)  # the check can fail
        hmp_io(booted, "vda", f"write -P 0x77 {48 * MiB} 64K")
        assert guest_reads(booted, 0x77, 48 * MiB, 64 * 1024)
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(name)
    overlay = overlays / "vda.overlay.qcow2"
    assert overlay.is_file()  # the guest's writes are kept
    info = json.loads(sh("qemu-img", "info", "--output", "json", "-U", overlay).stdout)
    assert info["backing-filename"].startswith("nbd+unix:///vda?socket=")


def test_cleanup_after_nbdkit_is_killed(chain: tuple[LabVM, Path]) -> None:
    _vm, out = chain
    with mapped("-i", out, "-d", "loop", expect_exit=1) as m:
        device = m.value("device vda")
        nbdkit = [p for p, name in m.helpers.items() if name == "nbdkit"]
        assert len(nbdkit) == 1
        os.kill(nbdkit[0], signal.SIGKILL)
        assert m.proc.wait(timeout=60) == 1
        assert "nbdkit for vda ended" in m.proc.stderr.read()  # type: ignore[union-attr]
    assert_no_leftovers(device, m)


def test_stop_unmaps_a_running_instance(chain: tuple[LabVM, Path]) -> None:
    _vm, out = chain
    with mapped("-i", out, "-d", "loop") as m:
        device = m.value("device vda")
        proc = subprocess.run(
            [str(BIN / "virtnbdmap"), "--stop", "-d", device], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert m.proc.wait(timeout=30) == 0
    assert_no_leftovers(device, m)


def test_raw_files_and_broken_chains_are_refused(chain: tuple[LabVM, Path]) -> None:
    _vm, out = chain
    inc = next(out.glob("vda.inc.*.data"))
    proc = subprocess.run(
        [str(BIN / "virtnbdmap"), "-f", inc, "--listen", f"unix:{socket_path('x')}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "must start with a full or copy file" in proc.stderr


def guest_reads(vm: LabVM, pattern: int, offset: int, length: int) -> bool:
    """Whether the guest's disk vda reads ``pattern`` there (HMP ``qemu-io read -P``).

    qemu-io reports to QEMU's standard error, which libvirt keeps in the
    domain's log: the verdict is read from the log lines the command added.
    """
    log = Path("/var/log/libvirt/qemu") / f"{vm.name}.log"
    start = log.stat().st_size
    hmp_io(vm, "vda", f"read -P {pattern:#x} {offset} {length}")
    done = f"read {length}/{length} bytes at offset {offset}"
    deadline = time.monotonic() + 20  # virtlogd writes the log behind QEMU
    added = ""
    while done not in added and time.monotonic() < deadline:
        time.sleep(0.1)
        with open(log, "rb") as fh:
            fh.seek(start)
            added = fh.read().decode(errors="replace")
    assert done in added, added
    return "Pattern verification failed" not in added


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def process_name(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def assert_no_leftovers(device: str | None, m: Mapping) -> None:
    """No loop device, fuse mount, helper process, socket or work folder left."""
    assert m.proc.poll() is not None
    if device:
        loop = Path("/sys/block") / os.path.basename(device) / "loop" / "backing_file"
        assert not loop.exists(), f"{device} is still attached"
    socket = Path(m.value("export vda").split("socket=", 1)[1])
    assert not socket.exists()
    if socket.parent.name.startswith("virtnbdmap."):
        assert not socket.parent.exists()
    assert str(socket.parent) not in Path("/proc/mounts").read_text()
    for pid, name in m.helpers.items():
        assert process_name(pid) != name, f"{name} (pid {pid}) still runs"


def test_block_status_replies_are_bounded_on_a_fragmented_chain(
    conn: libvirt.virConnect,
) -> None:
    """Clients ask for the rest of the disk at once; a reply lists at most a
    bounded number of runs (else qemu-img convert slows to a crawl)."""
    writes = [f"write -P 0x5{n % 10} {n * 128 * 1024} 64K" for n in range(300)]
    vm = create_vm(conn, [DiskSpec("vda", DISK_SIZE, writes=writes)], cdrom=False)
    try:
        out = vm.folder / "fragmented"
        backup_ok(vm, out, "copy")
        sock = socket_path("extents")
        with mapped("-i", out, "--disk", "vda", "--listen", f"unix:{sock}", "-r") as m:
            h = nbd.NBD()
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.connect_uri(m.value("export vda"))
            replies: list[list[int]] = []

            def collect(_context: str, _offset: int, entries: list[int], _err: object) -> int:
                replies.append(list(entries))
                return 0

            position, data = 0, []
            while position < DISK_SIZE:
                replies.clear()
                h.block_status(DISK_SIZE - position, position, collect)
                entries = replies[0]
                assert 0 < len(entries) // 2 <= 256
                for length, flags in zip(entries[::2], entries[1::2], strict=True):
                    if not flags & nbd.STATE_HOLE:
                        data.append((position, length))
                    position += length
            h.shutdown()
        assert data == [(n * 128 * 1024, 64 * 1024) for n in range(300)]
    finally:
        remove_vm(vm)


def test_blocksize_splits_reads_and_hexdump_logs_them(
    chain: tuple[LabVM, Path], tmp_path: Path
) -> None:
    """2.x's -b caps the requests the plugin sees; -H logs each read to the -L file."""
    _vm, out = chain
    log = tmp_path / "map.log"
    sock = socket_path("hexdump")
    with mapped(
        "-i", out, "--disk", "vda", "--listen", f"unix:{sock}", "-r", "-b", "4096", "-H", "-L", log
    ) as m:
        h = nbd.NBD()
        h.connect_uri(m.value("export vda"))
        data = h.pread(64 * 1024, 41 * MiB)
        h.shutdown()
    assert data == b"\x22" * 64 * 1024
    lines = log.read_text().splitlines()
    reads = [line for line in lines if line.startswith(f"read {41 * MiB:#x} ")]
    assert reads == [f"read {41 * MiB:#x} +4096: " + " ".join(["22"] * 32)]
    split = [line for line in lines if line.startswith("read ") and "+4096:" in line]
    assert len(split) >= 16 and not [line for line in lines if "+65536:" in line]
    assert any("virtnbdmap" in line for line in lines)  # -L also takes the log


CTRL_C_RUNS = 10


def test_ctrl_c_always_unmaps_the_loop_device(chain: tuple[LabVM, Path]) -> None:
    """Ctrl-C reaches virtnbdmap and its helpers at once (the terminal signals
    the whole process group): each of these runs must end and leave nothing.
    One in about three used to hang with the loop device attached (the signal
    handler waited for the lock the interrupted wait held)."""
    _vm, out = chain
    for run in range(CTRL_C_RUNS):
        proc = subprocess.Popen(
            [str(BIN / "virtnbdmap"), "-i", out, "--disk", "vda", "-d", "loop", "-r"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            mapping = Mapping(proc)
            assert proc.stdout is not None
            for line in proc.stdout:
                mapping.lines.append(line.rstrip("\n"))
                if line.startswith("ready:"):
                    break
            device = mapping.value("device vda")
            mapping.helpers = {p: process_name(p) for p in children(proc.pid)}
            time.sleep(run * 0.02)  # land in other moments of the wait loop
            os.killpg(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"run {run}: virtnbdmap hangs after Ctrl-C") from None
            assert code == 0, (run, proc.stderr.read())  # type: ignore[union-attr]
            assert_no_leftovers(device, mapping)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()


def _plugin(files: list[Path]) -> nbd.NBD:
    """The chain served by the plugin in a real nbdkit on a private pipe."""
    handle = nbd.NBD()
    handle.connect_command(
        ["nbdkit", "-s", "--exit-with-parent", "python", PLUGIN, *(f"file={f}" for f in files)]
    )
    return handle


def _summed_unit_to_flip(path: Path) -> tuple[int, int]:
    """(disk offset of a summed MiB of the full that no inc overwrites, file
    offset of a byte inside it away from the 64 KiB the fingerprint covers)."""
    index = FileIndex.from_bytes(Path(index_path(str(path))).read_bytes(), str(path))
    size = path.stat().st_size
    for extent in index.extents:
        if extent.is_zero or extent.pieces or not extent.sums:
            continue
        for number in range(len(extent.sums)):
            start = extent.start + number * SUM_UNIT
            length = min(SUM_UNIT, extent.start + extent.length - start)
            at = extent.offset + number * SUM_UNIT + length // 2
            if (start + length <= 40 * MiB or start >= 45 * MiB) and (
                64 * 1024 <= at < size - 64 * 1024
            ):
                return start, at
    raise AssertionError(f"{path.name}: no summed unit to damage (an index without sums?)")


def test_the_plugin_serves_no_flipped_byte_of_a_plain_file(
    chain: tuple[LabVM, Path], tmp_path: Path
) -> None:
    """A flipped byte in the plain full's payload (its index still bound: the
    fingerprint and checksum file do not cover it) is an I/O error for any
    read of its MiB, every time; 2.47's map served it. Other MiBs read as
    the intact chain serves them."""
    _vm, out = chain
    folder = tmp_path / "set"
    shutil.copytree(out, folder)
    full = folder / "vda.full.data"
    start, at = _summed_unit_to_flip(full)
    raw = bytearray(full.read_bytes())
    raw[at] ^= 0x01
    full.write_bytes(raw)

    def files(where: Path) -> list[Path]:
        return sorted(where.glob("vda.*.data"), key=lambda p: (".inc." in p.name, p.name))

    intact, damaged = _plugin(files(out)), _plugin(files(folder))
    try:
        for _ in range(2):
            with pytest.raises(nbd.Error) as err:
                damaged.pread(4096, start)  # the unit's first bytes, not the flipped one
            assert err.value.errnum == errno.EIO
        other = 0 if start >= SUM_UNIT else 2 * SUM_UNIT
        assert damaged.pread(SUM_UNIT, other) == intact.pread(SUM_UNIT, other)
    finally:
        for handle in (intact, damaged):
            handle.shutdown()
