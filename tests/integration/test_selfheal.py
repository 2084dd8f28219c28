"""Chains that heal themselves: lost checkpoints, lost bitmaps, restarted VMs."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import libvirt

from libvirtnbdbackup.adapters import qemu
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


def restored_equals(vm: LabVM, folder: Path, dest: Path) -> bool:
    return images_identical(vm.images["vda"], restore_image(folder, dest))


def snapshot(vm: LabVM, dest: Path) -> Path:
    """The disk's current content, read through a short pause of the VM."""
    vm.dom.suspend()
    try:
        sh("qemu-img", "convert", "-U", "-O", "qcow2", vm.images["vda"], dest)
    finally:
        vm.dom.resume()
    return dest


def test_lost_checkpoints_are_redefined(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    hmp_io(vm, "vda", "write -P 0x11 8M 1M")
    backup_ok(vm, out, "inc")
    for name in ("virtnbdbackup.1", "virtnbdbackup.0"):
        sh("virsh", "checkpoint-delete", vm.name, name, "--metadata")
    assert vm.checkpoints() == []

    hmp_io(vm, "vda", "write -P 0x22 9M 1M")
    log = backup_ok(vm, out, "inc")
    assert "checkpoint virtnbdbackup.0 was missing in libvirt: redefined" in log
    assert "checkpoint virtnbdbackup.1 was missing in libvirt: redefined" in log
    assert (out / "vda.inc.virtnbdbackup.2.data").is_file()
    assert vm.checkpoints() == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
    vm.dom.suspend()
    assert restored_equals(vm, out, tmp_path / "restored")
    vm.dom.resume()


def test_vm_destroyed_and_started_again_keeps_the_chain(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    hmp_io(vm, "vda", "write -P 0x33 20M 2M")
    vm.dom.destroy()
    vm.dom.create()
    hmp_io(vm, "vda", "write -P 0x34 30M 1M")
    log = backup_ok(vm, out, "inc")
    # The one warning is the freeze's: this firmware-only VM has no guest agent.
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "not frozen" in warnings[0], log
    inc = out / "vda.inc.virtnbdbackup.1.data"
    assert inc.is_file() and inc.stat().st_size < 4 * 1024**2
    vm.dom.suspend()
    assert restored_equals(vm, out, tmp_path / "restored")
    vm.dom.resume()


def test_missing_bitmap_starts_a_new_chain(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    hmp_io(vm, "vda", "write -P 0x44 40M 1M")
    backup_ok(vm, out, "inc")
    before = snapshot(vm, tmp_path / "before.qcow2")

    vm.dom.destroy()  # the bitmap disappears from the image, libvirt still lists it
    sh("qemu-img", "bitmap", "--remove", vm.images["vda"], "virtnbdbackup.1")
    vm.dom.create()
    hmp_io(vm, "vda", "write -P 0x45 50M 1M")

    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "inc", "-o", out, "-n", "--strict")
    assert proc.returncode == 2, proc.stderr  # done, with a warning that says what happened
    assert "a full backup starts a new chain" in proc.stderr
    archives = list(out.glob("chain.*"))
    assert len(archives) == 1
    assert (archives[0] / "vda.inc.virtnbdbackup.1.data").is_file()
    assert (out / "vda.full.data").is_file() and not (out / "vda.inc.virtnbdbackup.1.data").exists()
    assert vm.checkpoints() == ["virtnbdbackup.0"]

    vm.dom.suspend()
    assert restored_equals(vm, out, tmp_path / "new-chain")
    vm.dom.resume()
    proc = run_tool("virtnbdrestore", "-i", archives[0], "-o", tmp_path / "old-chain", "-n")
    assert proc.returncode == 0, proc.stderr
    assert images_identical(before, tmp_path / "old-chain" / vm.images["vda"].name)

    hmp_io(vm, "vda", "write -P 0x46 60M 1M")
    backup_ok(vm, out, "inc")  # the new chain goes on
    assert (out / "vda.inc.virtnbdbackup.1.data").is_file()


def test_printonly_and_threshold(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    hmp_io(vm, "vda", "write -P 0x55 70M 2M")
    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "inc", "-o", out, "-p", "-n")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 2 * 1024**2
    assert not list(out.glob("*.inc.*.data"))

    log = backup_ok(vm, out, "inc", "-T", str(64 * 1024**2))
    assert "skipping the inc backup" in log and not list(out.glob("*.inc.*.data"))
    assert vm.checkpoints() == ["virtnbdbackup.0"]
    backup_ok(vm, out, "inc", "-T", str(1024**2))
    assert (out / "vda.inc.virtnbdbackup.1.data").is_file()
    shutil.rmtree(out)


def test_qcow2_v2_image_gets_a_clear_message(conn: libvirt.virConnect, tmp_path: Path) -> None:
    vm = create_vm(
        conn,
        [DiskSpec("vda", GiB, options="compat=0.10", writes=["write -P 0x61 0 1M"])],
        cdrom=False,
    )
    try:
        proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "full", "-o", tmp_path / "f", "-n")
        assert proc.returncode == 1
        assert "qcow2 v2 image" in proc.stderr and "-l copy" in proc.stderr
        assert vm.checkpoints() == []
        backup_ok(vm, tmp_path / "copy", "copy")
        assert images_identical(vm.images["vda"], restore_image(tmp_path / "copy", tmp_path / "r"))
    finally:
        remove_vm(vm)


def test_without_sparse_detection_trimmed_blocks_are_saved_as_data(
    small_vm: LabVM, tmp_path: Path
) -> None:
    vm = small_vm
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    backup_ok(vm, sparse, "full")
    backup_ok(vm, dense, "full")  # a new chain for the second folder
    hmp_io(vm, "vda", "write -P 0x71 64M 2M")
    hmp_io(vm, "vda", "discard 64M 1M")
    backup_ok(vm, dense, "inc", "--no-sparse-detection")
    meta = read_meta(str(dense / "vda.inc.virtnbdbackup.1.data"))
    assert meta.data_size == 2 * 1024**2  # the trimmed half is read and saved too
    vm.dom.suspend()
    assert images_identical(vm.images["vda"], restore_image(dense, tmp_path / "r"))
    vm.dom.resume()


def test_crashed_qemu_leaves_an_in_use_bitmap_and_a_new_chain_starts(
    small_vm: LabVM, tmp_path: Path
) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    hmp_io(vm, "vda", "write -P 0x81 40M 1M")
    backup_ok(vm, out, "inc")
    vm.dom.destroy()  # QEMU stores the bitmaps in the image, and flags them in use on start
    vm.dom.create()
    hmp_io(vm, "vda", "write -P 0x82 41M 1M")

    pid = int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # QEMU cannot store its bitmaps: they stay "in-use"
    for _ in range(100):
        if vm.state() == libvirt.VIR_DOMAIN_SHUTOFF:
            break
        time.sleep(0.1)
    assert vm.state() == libvirt.VIR_DOMAIN_SHUTOFF
    bitmaps = qemu.image_bitmaps(qemu.image_info(str(vm.images["vda"])))
    assert "in-use" in bitmaps["virtnbdbackup.1"], bitmaps
    vm.dom.create()
    hmp_io(vm, "vda", "write -P 0x83 42M 1M")

    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "inc", "-o", out, "-n", "--strict")
    assert proc.returncode == 2, proc.stderr
    assert "a full backup starts a new chain" in proc.stderr
    assert len(list(out.glob("chain.*"))) == 1
    assert vm.checkpoints() == ["virtnbdbackup.0"]
    vm.dom.suspend()
    assert restored_equals(vm, out, tmp_path / "restored")
    vm.dom.resume()


def test_bitmaps_left_without_checkpoints_are_removed_for_a_new_chain(
    small_vm: LabVM, tmp_path: Path
) -> None:
    vm = small_vm
    old, new = tmp_path / "old", tmp_path / "new"
    backup_ok(vm, old, "full")
    hmp_io(vm, "vda", "write -P 0x91 8M 1M")
    backup_ok(vm, old, "inc")
    for name in ("virtnbdbackup.1", "virtnbdbackup.0"):  # libvirt forgets, QEMU keeps bitmaps
        sh("virsh", "checkpoint-delete", vm.name, name, "--metadata")

    log = backup_ok(vm, new, "full")  # a new folder: no saved checkpoint XML to redefine
    assert "bitmap virtnbdbackup.0 was left in disk(s) vda without a libvirt checkpoint" in log
    hmp_io(vm, "vda", "write -P 0x92 9M 1M")
    log = backup_ok(vm, new, "inc")
    assert "bitmap virtnbdbackup.1 was left in disk(s) vda" in log
    assert vm.checkpoints() == ["virtnbdbackup.0", "virtnbdbackup.1"]
    vm.dom.suspend()
    assert restored_equals(vm, new, tmp_path / "restored")
    vm.dom.resume()
