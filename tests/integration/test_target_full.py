"""A backup target that fills up: one line naming the file, exit 1, no hang,
nothing half-written left, the VM untouched, the previous chain kept (or
the message says what was given up)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from .vmlab import (
    DiskSpec,
    LabVM,
    MiB,
    Mirror,
    backup_ok,
    create_vm,
    images_identical,
    remove_vm,
    restore_image,
    run_tool,
    small_filesystem,
)


@pytest.fixture()
def vm64(conn: libvirt.virConnect) -> Iterator[LabVM]:
    lab = create_vm(conn, [DiskSpec("vda", 256 * MiB, random_mib=64)], cdrom=False)
    yield lab
    remove_vm(lab)


@pytest.fixture()
def small(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "small", 16) as path:
        yield path


def failed_backup(vm: LabVM, out: Path, *args: str) -> str:
    """A backup that must fail with one error line and leave nothing behind."""
    # A hang (once: in interpreter shutdown, libnbd) ends in TimeoutExpired.
    proc = run_tool(
        "virtnbdbackup", "-d", vm.name, "-l", "full", "-n", "-o", out, *args, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert not list(out.glob("*.partial")) and not list(out.glob("*.data"))
    assert vm.state() == libvirt.VIR_DOMAIN_RUNNING and not vm.has_job()
    return errors[0]


@pytest.mark.parametrize("compress", [[], ["-z"]], ids=["plain", "lz4"])
def test_a_full_target_is_one_line_naming_the_file(
    vm64: LabVM, small: Path, compress: list[str]
) -> None:
    out = small / "b"
    error = failed_backup(vm64, out, *compress)
    assert f"cannot write {out}/vda.full.data.partial: No space left on device" in error
    assert vm64.checkpoints() == [], "the failed full's checkpoint is taken back"


def test_a_full_that_cannot_fit_keeps_the_previous_chain(
    vm64: LabVM, small: Path, tmp_path: Path
) -> None:
    mirror = Mirror.of(vm64, "vda", tmp_path)
    chain = tmp_path / "chain"
    backup_ok(vm64, chain, "full")
    error = failed_backup(vm64, small / "b")
    assert "would not fit" in error and "nothing was changed" in error
    assert vm64.checkpoints() == ["virtnbdbackup.0"]

    mirror.write("write -P 0x3c 1M 1M")
    log = backup_ok(vm64, chain, "inc")
    assert "new chain" not in log
    restored = restore_image(chain, tmp_path / "restored")
    assert images_identical(restored, mirror.path)


def test_a_compressed_full_that_fails_says_what_it_gave_up(
    vm64: LabVM, small: Path, tmp_path: Path
) -> None:
    """The compressed size is unknown beforehand: the full starts, removes the
    previous chain's checkpoints (libvirt keeps one virtnbdbackup.0), fails."""
    chain = tmp_path / "chain"
    backup_ok(vm64, chain, "full")
    error = failed_backup(vm64, small / "b", "-z")
    assert "No space left on device" in error
    assert "removed the checkpoints of the previous chain (virtnbdbackup.0)" in error

    log = backup_ok(vm64, chain, "inc")  # the next run completes, and says how
    assert "starts a new chain" in log
