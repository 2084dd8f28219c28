"""Clear failures for a wrong domain or URI; boot files saved with the backup."""

from __future__ import annotations

from pathlib import Path

import libvirt

from .vmlab import OVMF_CODE, LabVM, run_tool


def test_missing_domain_fails_with_exit_1(conn: libvirt.virConnect, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    proc = run_tool("virtnbdbackup", "-d", "vnbt-no-such-vm", "-l", "full", "-o", out)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "domain 'vnbt-no-such-vm' not found" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("*.data*"))


def test_unreachable_libvirtd_fails_with_exit_1(tmp_path: Path) -> None:
    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    proc = run_tool("virtnbdbackup", "-U", uri, "-d", "any", "-l", "copy", "-o", tmp_path / "b")
    assert proc.returncode == 1
    assert "cannot connect to libvirt at" in proc.stderr and "Traceback" not in proc.stderr


def test_loader_and_nvram_are_saved(uefi_vm: LabVM, tmp_path: Path) -> None:
    vm = uefi_vm
    full, copy = tmp_path / "full", tmp_path / "copy"
    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "full", "-n", "-o", full)
    assert proc.returncode == 0, proc.stderr
    nvram = vm.folder / f"{vm.name}_VARS.fd"
    saved_loader = full / f"{OVMF_CODE.name}.virtnbdbackup.0"
    saved_nvram = full / f"{nvram.name}.virtnbdbackup.0"
    assert saved_loader.read_bytes() == OVMF_CODE.read_bytes()
    assert saved_nvram.read_bytes() == nvram.read_bytes()

    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "copy", "-n", "-o", copy)
    assert proc.returncode == 0, proc.stderr
    assert (copy / OVMF_CODE.name).is_file() and (copy / nvram.name).is_file()
