"""Shut-off domains: copy and incremental backups through qemu-nbd, and -S."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import libvirt

from libvirtnbdbackup.format.reader import read_meta

from .vmlab import (
    LabVM,
    backup_ok,
    hmp_io,
    images_identical,
    restore_image,
    sh,
)


def test_offline_inc_after_writes_with_the_vm_shut_off(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    hmp_io(vm, "vda", "write -P 0x11 8M 1M")
    backup_ok(vm, out, "inc")
    at_inc1 = tmp_path / "at-inc1.qcow2"
    vm.dom.destroy()  # QEMU stores the bitmaps in the image as it quits
    shutil.copyfile(vm.images["vda"], at_inc1)

    sh(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x22 16M 2M",
        "-c",
        "write -P 0x23 600M 64K",
        vm.images["vda"],
    )
    backup_ok(vm, out, "inc")
    offline = list(out.glob("vda.inc.virtnbdbackup.1.*.data"))
    assert len(offline) == 1, sorted(p.name for p in out.iterdir())
    meta = read_meta(str(offline[0]))
    assert (meta.checkpoint_name, meta.parent_checkpoint) == ("virtnbdbackup.1", "virtnbdbackup.1")
    assert meta.data_size == 2 * 1024**2 + 64 * 1024
    assert vm.checkpoints() == ["virtnbdbackup.0", "virtnbdbackup.1"]

    assert images_identical(vm.images["vda"], restore_image(out, tmp_path / "latest"))
    assert images_identical(
        at_inc1, restore_image(out, tmp_path / "until", "--until", "virtnbdbackup.1")
    )

    # Back online: the next incremental still saves everything since .1.
    vm.dom.create()
    hmp_io(vm, "vda", "write -P 0x33 24M 1M")
    backup_ok(vm, out, "inc")
    assert (out / "vda.inc.virtnbdbackup.2.data").is_file()
    vm.dom.suspend()
    assert images_identical(vm.images["vda"], restore_image(out, tmp_path / "after"))
    vm.dom.resume()


def test_offline_full_becomes_copy(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    vm.dom.destroy()
    out = tmp_path / "backup"
    log = backup_ok(vm, out, "full")
    assert "a full backup becomes a copy" in log
    assert (out / "vda.copy.data").is_file() and not (out / f"{vm.name}.cpt").exists()
    assert vm.state() == libvirt.VIR_DOMAIN_SHUTOFF
    assert images_identical(vm.images["vda"], restore_image(out, tmp_path / "restored"))


def test_start_domain_takes_a_full_backup_and_shuts_it_off(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    vm.dom.destroy()
    out = tmp_path / "backup"
    backup_ok(vm, out, "full", "-S")
    assert (out / "vda.full.data").is_file()
    assert vm.checkpoints() == ["virtnbdbackup.0"]
    assert vm.state() == libvirt.VIR_DOMAIN_SHUTOFF
    assert images_identical(vm.images["vda"], restore_image(out, tmp_path / "restored"))


def test_pause_resumes_the_domain(small_vm: LabVM, tmp_path: Path) -> None:
    vm = small_vm
    backup_ok(vm, tmp_path / "backup", "copy", "--pause")
    assert vm.state() == libvirt.VIR_DOMAIN_RUNNING


def test_offline_diffs_hold_every_change_since_the_last_inc(
    small_vm: LabVM, tmp_path: Path
) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    hmp_io(vm, "vda", "write -P 0x11 8M 1M")
    backup_ok(vm, out, "inc")
    vm.dom.destroy()

    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 16M 2M", vm.images["vda"])
    backup_ok(vm, out, "diff")
    first = tmp_path / "at-diff1.qcow2"
    shutil.copyfile(vm.images["vda"], first)
    time.sleep(1)  # diff files are named by their epoch second
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 700M 1M", vm.images["vda"])
    backup_ok(vm, out, "diff")

    diffs = sorted(out.glob("vda.diff.*.data"))
    assert len(diffs) == 2, sorted(p.name for p in out.iterdir())
    sizes = [read_meta(str(d)).data_size for d in diffs]
    assert sizes == [2 * 1024**2, 3 * 1024**2]  # the second one repeats the first one's change
    assert all(read_meta(str(d)).parent_checkpoint == "virtnbdbackup.1" for d in diffs)
    assert vm.checkpoints() == ["virtnbdbackup.0", "virtnbdbackup.1"]
    assert vm.state() == libvirt.VIR_DOMAIN_SHUTOFF

    assert images_identical(vm.images["vda"], restore_image(out, tmp_path / "latest"))
    assert images_identical(
        first,
        restore_image(
            out,
            tmp_path / "first",
            "--sequence",
            f"vda.full.data,vda.inc.virtnbdbackup.1.data,{diffs[0].name}",
        ),
    )


def test_offline_compressed_copy_reads_over_one_connection_per_lane(
    small_vm: LabVM, tmp_path: Path
) -> None:
    """qemu-nbd must take the extra connections of the lz4 lanes."""
    vm = small_vm
    vm.dom.destroy()
    out = tmp_path / "backup"
    backup_ok(vm, out, "copy", "-z")
    meta = read_meta(str(out / "vda.copy.data"))
    assert meta.is_compressed
    assert images_identical(vm.images["vda"], restore_image(out, tmp_path / "restored"))


def test_offline_inc_honours_the_threshold(small_vm: LabVM, tmp_path: Path) -> None:
    """-T counts the changes in the image's bitmap when there is no QEMU to ask."""
    vm = small_vm
    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    vm.dom.destroy()
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 32M 1M", vm.images["vda"])

    log = backup_ok(vm, out, "inc", "-T", str(2 * 1024**2))
    assert "skipping the inc backup: 1048576 bytes changed" in log
    assert not list(out.glob("vda.inc.*"))

    backup_ok(vm, out, "inc", "-T", str(512 * 1024))
    assert len(list(out.glob("vda.inc.virtnbdbackup.0.*.data"))) == 1
    assert images_identical(vm.images["vda"], restore_image(out, tmp_path / "restored"))
