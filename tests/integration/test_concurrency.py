"""Two runs on one folder: the second is refused while the first holds it."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from .vmlab import BIN, DiskSpec, LabVM, MiB, create_vm, images_identical, remove_vm, run_tool


@pytest.fixture(scope="module")
def data_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """Enough incompressible data that a backup or restore runs for a while."""
    lab = create_vm(conn, [DiskSpec("vda", 512 * MiB, random_mib=256)], cdrom=False)
    yield lab
    remove_vm(lab)


@pytest.fixture(scope="module")
def full_set(data_vm: LabVM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("set") / "backup"
    proc = run_tool("virtnbdbackup", "-d", data_vm.name, "-l", "copy", "-n", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out


def start(tool: str, *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / tool), "-n", *[str(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_when(proc: subprocess.Popen[str], path: Path) -> None:
    """Freeze ``proc`` (SIGSTOP) as soon as it has created ``path``."""
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)


def finish(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGCONT)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return err


def test_a_second_restore_into_the_folder_is_refused(
    data_vm: LabVM, full_set: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "restored"
    image = dest / data_vm.images["vda"].name
    first = start("virtnbdrestore", "-i", full_set, "-o", dest)
    try:
        stop_when(first, Path(f"{image}.partial"))
        second = run_tool("virtnbdrestore", "-n", "-i", full_set, "-o", dest)
        assert Path(f"{image}.partial").exists(), "the second restore removed the first's work"
        assert not image.exists()
    finally:
        finish(first)
    assert second.returncode == 1, second.stderr
    errors = [line for line in second.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, second.stderr
    assert "in use by virtnbdrestore" in errors[0] and f"pid {first.pid}" in errors[0]
    assert images_identical(image, data_vm.images["vda"])


def test_a_second_backup_into_the_folder_is_refused(data_vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    first = start("virtnbdbackup", "-d", data_vm.name, "-l", "full", "-o", out)
    try:
        stop_when(first, out / "vda.full.data.partial")
        refusals = [
            run_tool("virtnbdbackup", "-d", data_vm.name, "-l", level, "-n", "-o", out)
            for level in ("full", "inc", "auto")
        ]
    finally:
        finish(first)
    for proc in refusals:
        assert proc.returncode == 1, proc.stderr
        assert f"in use by virtnbdbackup -l full of domain {data_vm.name} (pid {first.pid}" in (
            proc.stderr
        )
        assert "Traceback" not in proc.stderr
    assert (out / "vda.full.data").is_file() and not list(out.glob("*.partial"))
    assert not list(out.glob(".virtnbdbackup.lock")), "the lock is released at the end"
