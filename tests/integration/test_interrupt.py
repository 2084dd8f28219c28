"""Stopping a backup: Ctrl-C mid-way, and -k for a job left behind."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from .vmlab import BIN, DiskSpec, GiB, LabVM, create_vm, remove_vm, run_tool, sh


@pytest.fixture()
def busy_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """Incompressible data that takes lz4 at its slowest level a while."""
    lab = create_vm(conn, [DiskSpec("vda", 1 * GiB, random_mib=768)], cdrom=False)
    yield lab
    remove_vm(lab)


def test_ctrl_c_aborts_job_and_leaves_no_partial_files(busy_vm: LabVM, tmp_path: Path) -> None:
    vm = busy_vm
    out = tmp_path / "backup"
    proc = subprocess.Popen(
        [BIN / "virtnbdbackup", "-d", vm.name, "-l", "full", "-z", "16", "-n", "-o", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = out / "vda.full.data.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 1024 * 1024):
        assert proc.poll() is None, f"backup ended before it could be interrupted: {proc.stderr}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)

    assert proc.returncode == 1, err
    assert "SIGINT" in err
    assert not list(out.glob("*.partial")) and not list(out.glob("*.data"))
    assert vm.state() == libvirt.VIR_DOMAIN_RUNNING
    assert not vm.has_job()
    assert vm.checkpoints() == [], "the checkpoint of the aborted full backup is taken back"
    for pattern in (f"backup.{vm.name}.*", f"virtnbdbackup.*/backup.{vm.name}.*"):
        assert not list(Path("/var/tmp").glob(pattern)), "scratch files left behind"


def test_killonly_stops_a_leftover_backup_job(busy_vm: LabVM, tmp_path: Path) -> None:
    vm = busy_vm
    socket = Path("/var/tmp") / f"{vm.name}.leftover.sock"  # qemu must reach it
    xml = tmp_path / "job.xml"
    xml.write_text(
        f"<domainbackup mode='pull'><server transport='unix' socket='{socket}'/></domainbackup>"
    )
    sh("virsh", "backup-begin", vm.name, xml)
    assert vm.has_job()

    blocked = run_tool("virtnbdbackup", "-d", vm.name, "-l", "copy", "-n", "-o", tmp_path / "b")
    assert blocked.returncode == 1
    assert "already has a backup job running" in blocked.stderr and "-k" in blocked.stderr

    killed = run_tool("virtnbdbackup", "-d", vm.name, "-k", "-o", tmp_path / "k")
    assert killed.returncode == 0, killed.stderr
    assert not vm.has_job()
