"""What virtnbdbackup 2.47's users rely on, beyond the option names.

Each test is a behaviour a 2.47 cron line or script depends on: the log
file names, the files a restore writes, what -p, -s, -q and -L do, what
``-o dump`` prints and when ``-o verify`` is content.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from libvirtnbdbackup.format.reader import read_meta

from .vmlab import (
    DiskSpec,
    GiB,
    LabVM,
    backup_ok,
    create_vm,
    hmp_io,
    images_identical,
    remove_vm,
    restore_image,
    run_tool,
    sh,
)


@pytest.fixture(scope="module")
def compat_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    lab = create_vm(
        conn,
        [DiskSpec("vda", 1 * GiB, writes=["write -P 0xab 0 2M", "write -P 0xcd 600M 1M"])],
        cdrom=False,
    )
    yield lab
    remove_vm(lab)


@pytest.fixture(scope="module")
def chain(compat_vm: LabVM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full and an incremental backup of ``compat_vm``, taken with -l auto."""
    out = tmp_path_factory.mktemp("chain") / "backup"
    backup_ok(compat_vm, out, "auto")
    hmp_io(compat_vm, "vda", "write -P 0x11 10M 1M")
    # Log names carry the second a run starts (2.47's format): two runs in one
    # second share one log, so the second run starts in the next one.
    time.sleep(1.01 - time.time() % 1)
    backup_ok(compat_vm, out, "auto")
    return out


def test_auto_names_its_logs_after_the_level_asked_for(chain: Path) -> None:
    logs = sorted(p.name for p in chain.glob("backup.*.log"))
    assert len(logs) == 2 and all(name.startswith("backup.auto.") for name in logs), logs


def test_restore_writes_vmconfig_xml_unless_c_names_another(chain: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    restore_image(chain, plain)
    assert sorted(p.name for p in plain.glob("*.xml")) == ["vmconfig.xml"]
    adjusted = tmp_path / "adjusted"
    image = restore_image(chain, adjusted, "-c", "-C", "restored.xml")
    assert sorted(p.name for p in adjusted.glob("*.xml")) == ["restored.xml"]
    assert str(image) in (adjusted / "restored.xml").read_text()


def test_sequence_names_the_image_after_the_disk(
    compat_vm: LabVM, chain: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "seq"
    sock = Path(f"/var/tmp/virtnbdrestore.test{os.getpid()}")
    log = tmp_path / "restore.log"
    image = restore_image(
        chain, dest, "-s", "vda.full.data,vda.inc.virtnbdbackup.1.data", "-f", sock, "-L", log, "-v"
    )
    assert image == dest / "vda"
    assert f"--socket {sock} " in log.read_text()  # -L: the log, debug lines included
    assert not sock.exists()  # -f: qemu-nbd's socket, gone with it
    full_only = restore_image(chain, tmp_path / "full", "-u", "virtnbdbackup.0")
    assert not images_identical(full_only, image)  # the inc was applied


def test_dump_prints_the_stored_meta_in_file_time_order(chain: Path) -> None:
    files = sorted(chain.glob("*.data"), key=lambda p: p.stat().st_mtime)
    proc = run_tool("virtnbdrestore", "-i", chain, "-o", "dump")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    stored = [json.loads(_meta_text(f)) for f in files]
    assert printed == stored
    assert [list(entry) for entry in printed] == [list(entry) for entry in stored]
    same = run_tool("virtnbdrestore", "-a", "dump", "-i", chain, "-o", "/nonexistent")
    assert same.returncode == 0 and json.loads(same.stdout) == printed
    detail = json.loads(
        run_tool("virtnbdrestore", "-i", chain, "-o", "dump", "--dump-detail").stdout
    )
    assert [entry["file"] for entry in detail] == [f.name for f in files]


def _meta_text(path: Path) -> str:
    with open(path, "rb") as fh:
        header = fh.read(40)
        return fh.read(int(header.split()[2], 16)).decode()


def test_verify_without_checksum_files_warns_and_passes(chain: Path, tmp_path: Path) -> None:
    unzipped = tmp_path / "unzipped"
    unzipped.mkdir()
    for data in chain.glob("*.data"):
        os.link(data, unzipped / data.name)  # as unzipping a -o - backup leaves them
    proc = run_tool("virtnbdrestore", "-i", unzipped, "-o", "verify")
    assert proc.returncode == 0, proc.stderr
    assert "no checksum file" in proc.stderr
    strict = run_tool("virtnbdrestore", "-i", unzipped, "-o", "verify", "--strict")
    assert strict.returncode == 2
    checked = run_tool("virtnbdrestore", "-a", "verify", "-i", chain, "-o", "x", "-B", "65536")
    assert checked.returncode == 0 and "OK" in checked.stderr


@pytest.mark.parametrize(
    "leftover",
    [
        "vmconfig.virtnbdbackup.2.xml.partial",
        "vda.inc.virtnbdbackup.2.data.chksum.partial",
        "checkpoints/virtnbdbackup.2.xml.partial",
    ],
)
def test_any_partial_file_makes_inc_and_diff_refuse(
    compat_vm: LabVM, chain: Path, tmp_path: Path, leftover: str
) -> None:
    out = tmp_path / "copy-of-chain"
    sh("cp", "-a", chain, out)
    (out / leftover).write_bytes(b"half")
    for level in ("inc", "diff"):
        proc = run_tool("virtnbdbackup", "-d", compat_vm.name, "-l", level, "-o", out, "-n")
        assert proc.returncode == 1, proc.stderr
        assert "unfinished files of a failed backup" in proc.stderr
        assert Path(leftover).name in proc.stderr
    assert not list(out.glob("*.inc.virtnbdbackup.2.data"))


@pytest.mark.parametrize("level", ["copy", "full"])
def test_printonly_full_or_copy_prints_the_data_size_and_saves_nothing(
    compat_vm: LabVM, tmp_path: Path, level: str
) -> None:
    before = compat_vm.checkpoints()
    out = tmp_path / "estimate"
    proc = run_tool("virtnbdbackup", "-d", compat_vm.name, "-l", level, "-p", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "bytes of data extents to back up" in proc.stderr
    assert not list(out.glob("*.data*")) and not list(out.glob("vmconfig*"))
    assert compat_vm.checkpoints() == before and not compat_vm.has_job()
    copy = tmp_path / "copy"
    backup_ok(compat_vm, copy, "copy")
    assert int(proc.stdout) == read_meta(str(copy / "vda.copy.data")).data_size


def test_qemu_option_reads_extents_with_nbdinfo(compat_vm: LabVM, tmp_path: Path) -> None:
    plain, via_nbdinfo = tmp_path / "plain", tmp_path / "nbdinfo"
    backup_ok(compat_vm, plain, "copy")
    log = backup_ok(compat_vm, via_nbdinfo, "copy", "-q", "-v")
    assert "running nbdinfo --json --map=base:allocation" in log
    assert "running nbdinfo" not in backup_ok(compat_vm, tmp_path / "again", "copy", "-v")
    meta_plain = read_meta(str(plain / "vda.copy.data"))
    meta_q = read_meta(str(via_nbdinfo / "vda.copy.data"))
    assert meta_q.data_size == meta_plain.data_size
    restored = restore_image(via_nbdinfo, tmp_path / "restored")
    assert images_identical(restore_image(plain, tmp_path / "reference"), restored)


def test_startonly_leaves_the_job_running_until_killonly(compat_vm: LabVM, tmp_path: Path) -> None:
    before = compat_vm.checkpoints()
    out = tmp_path / "start"
    sock = Path(f"/var/tmp/virtnbdbackup.test{os.getpid()}")  # QEMU must reach the folder
    proc = run_tool(
        "virtnbdbackup", "-d", compat_vm.name, "-l", "full", "-s", "-f", sock, "-o", out
    )
    try:
        assert proc.returncode == 0, proc.stderr
        assert compat_vm.has_job()
        info = sh("nbdinfo", "--size", f"nbd+unix:///vda?socket={sock}").stdout
        assert int(info) == 1 * GiB
        assert not list(out.glob("*.data*")) and compat_vm.checkpoints() == before
    finally:
        kill = run_tool("virtnbdbackup", "-d", compat_vm.name, "-k", "-o", out)
    assert kill.returncode == 0, kill.stderr
    assert not compat_vm.has_job()


def test_syslog_option_sends_the_log_to_syslog(compat_vm: LabVM, tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(0.5)
    messages: list[str] = []
    done = threading.Event()

    def read() -> None:
        # Read while the backup runs, as syslog does: a unix datagram socket
        # queues only net.unix.max_dgram_qlen (10) messages, then the
        # sender waits.
        while True:
            try:
                messages.append(server.recv(65536).decode())
            except TimeoutError:
                if done.is_set():
                    return  # the backup ended and the queue is drained

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        env = dict(os.environ, VIRTNBDBACKUP_SYSLOG_SOCKET=str(path))
        proc = run_tool(
            "virtnbdbackup",
            "-d",
            compat_vm.name,
            "-l",
            "copy",
            "-L",
            "-n",
            "-o",
            tmp_path / "b",
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
    finally:
        done.set()
        reader.join()
        server.close()
    assert any("backup finished" in m for m in messages), messages


def test_saved_checkpoint_xml_has_247s_description_and_sizes(chain: Path) -> None:
    for name in ("virtnbdbackup.0", "virtnbdbackup.1"):
        root = ET.fromstring((chain / "checkpoints" / f"{name}.xml").read_text())
        assert root.findtext("description") == "Backup checkpoint"
        disks = root.findall("disks/disk")
        assert [d.get("name") for d in disks] == ["vda"]
        assert all(d.get("size", "").isdigit() for d in disks), ET.tostring(root)


def test_zip_backup_entries_are_mode_644_with_real_dates(compat_vm: LabVM, tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    archive = tmp_path / "backup.zip"
    with open(archive, "wb") as fh:
        proc = run_tool(
            "virtnbdbackup",
            "-d",
            compat_vm.name,
            "-l",
            "copy",
            "-o",
            "-",
            "-n",
            cwd=work,
            stdout=fh,
        )
    assert proc.returncode == 0, proc.stderr
    today = time.localtime()[:3]
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
    assert {i.filename for i in infos} >= {"vda.copy.data", "vmconfig.copy.xml"}
    assert all(i.external_attr >> 16 == 0o100644 for i in infos), infos
    assert all(i.date_time[:3] == today for i in infos), infos


def test_qemu_option_reads_the_dirty_bitmap_with_nbdinfo_too(
    compat_vm: LabVM, chain: Path, tmp_path: Path
) -> None:
    hmp_io(compat_vm, "vda", "write -P 0x33 300M 1M")
    plain, via_nbdinfo = tmp_path / "plain", tmp_path / "nbdinfo"
    for out in (plain, via_nbdinfo):
        sh("cp", "-a", chain, out)
    backup_ok(compat_vm, plain, "diff")
    log = backup_ok(compat_vm, via_nbdinfo, "diff", "-q", "-v")
    assert "--map=qemu:dirty-bitmap:backup-vda" in log
    [diff_plain] = plain.glob("vda.diff.*.data")
    [diff_q] = via_nbdinfo.glob("vda.diff.*.data")
    assert read_meta(str(diff_q)).data_size == read_meta(str(diff_plain)).data_size >= 1024**2
    assert images_identical(
        restore_image(plain, tmp_path / "r-plain"), restore_image(via_nbdinfo, tmp_path / "r-q")
    )
