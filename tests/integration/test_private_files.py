"""What backup and restore create is private: folders 0700 (restore
folders 0711, for QEMU's user), files 0600; sets of 2.47 with their 0755
folders keep working."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import libvirt

from .vmlab import (
    NAME_PREFIX,
    OVMF_CODE,
    LabVM,
    backup_ok,
    destroy,
    hmp_io,
    images_identical,
    restore_image,
    run_tool,
)

NOWHERE = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.lstat().st_mode)
        for p in [folder, *folder.rglob("*")]
    }


def test_backup_and_restore_create_private_files(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    out, restored = tmp_path / "backup", vm.folder / "restored-private"
    old = os.umask(0o022)  # the usual umask, which made everything world-readable
    try:
        backup_ok(vm, out, "full", "-z")
        hmp_io(vm, "vda", "write -P 0x3c 1M 1M")
        backup_ok(vm, out, "inc")
        image = restore_image(out, restored)
    finally:
        os.umask(old)
    found = modes(out)
    assert {n for n, m in found.items() if m != 0o600} == {".", "checkpoints"}, found
    assert found["."] == found["checkpoints"] == 0o700
    assert {"vda.full.data", "vda.inc.virtnbdbackup.1.data", "vmconfig.virtnbdbackup.0.xml",
            f"{vm.name}.cpt", "checkpoints/virtnbdbackup.1.xml"} <= set(found)  # fmt: skip
    assert any(n.startswith("backup.inc.") for n in found)
    assert stat.S_IMODE(restored.stat().st_mode) == 0o711
    found = {n: m for n, m in modes(restored).items() if n != "."}
    assert image.name in found and any(n.startswith("vmconfig") for n in found), found
    assert set(found.values()) == {0o600}, found  # also the restore's lock, if left
    vm.dom.suspend()
    assert images_identical(vm.images["vda"], image)
    vm.dom.resume()


def test_a_2_47_folder_of_mode_0755_takes_private_incrementals(
    small_vm: LabVM, tmp_path: Path
) -> None:
    out = tmp_path / "backup"
    backup_ok(small_vm, out, "full")
    for path in [out, *out.rglob("*")]:  # as 2.47 leaves a set
        path.chmod(0o755 if path.is_dir() else 0o644)
    backup_ok(small_vm, out, "inc")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755, "the admin's folder keeps its mode"
    assert stat.S_IMODE((out / "vda.inc.virtnbdbackup.1.data").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "vda.full.data").stat().st_mode) == 0o644


def test_password_on_the_command_line_is_warned_about(tmp_path: Path) -> None:
    args = ["-U", NOWHERE, "-d", "any", "-l", "copy", "-n"]
    proc = run_tool("virtnbdbackup", *args, "--password", "pw", "-o", tmp_path / "a")
    assert proc.returncode == 1
    assert "WARNING" in proc.stderr and "--password-file" in proc.stderr, proc.stderr
    (tmp_path / "pw").write_text("pw\n")
    proc = run_tool(
        "virtnbdbackup", *args, "--password-file", tmp_path / "pw", "-o", tmp_path / "b"
    )
    assert proc.returncode == 1 and "/nonexistent/libvirt-sock" in proc.stderr
    assert "WARNING" not in proc.stderr
    proc = run_tool("virtnbdrestore", "-i", tmp_path / "b", "-o", tmp_path / "r", "--password", "x")
    assert "WARNING" in proc.stderr and "--password-file" in proc.stderr, proc.stderr


def test_private_restore_of_a_uefi_domain_starts(
    conn: libvirt.virConnect, uefi_vm: LabVM, tmp_path: Path
) -> None:
    """libvirt gives QEMU's user the private images and NVRAM as the domain starts."""
    vm = uefi_vm
    out, restored = tmp_path / "backup", vm.folder / "restored-uefi"
    backup_ok(vm, out, "full")
    name = f"{NAME_PREFIX}private-{vm.name[len(NAME_PREFIX) :]}"
    proc = run_tool("virtnbdrestore", "-i", out, "-o", restored, "-n", "-D", "-N", name)
    assert proc.returncode == 0, proc.stderr
    found = {p.name: stat.S_IMODE(p.stat().st_mode) for p in restored.iterdir()}
    assert found.pop(OVMF_CODE.name) == 0o644, "the loader is public firmware QEMU reads"
    assert set(found.values()) == {0o600}, found
    dom = conn.lookupByName(name)
    try:
        dom.create()  # fails with "Permission denied" if QEMU cannot open a file
        # On this nested KVM the firmware sometimes hits an emulation failure
        # right after it started, which pauses the guest: QEMU had opened
        # every file by then.
        assert dom.state()[0] in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)
    finally:
        destroy(dom)
