from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from .guestlab import Guest, create_guest, remove_guest
from .vmlab import (
    DiskSpec,
    GiB,
    LabVM,
    MiB,
    create_vm,
    ensure_libvirtd,
    remove_leftovers,
    remove_vm,
    run_tool,
)

# vda: holes, data past 2 GiB, explicit zero clusters (unallocated and
# allocated), data up to the very last cluster.
VDA = DiskSpec(
    "vda",
    3 * GiB,
    writes=[
        "write -P 0xab 0 1M",
        "write -z 10M 2M",
        "write -P 0x5a 50M 1M",
        "write -z 50M 512K",
        "write -P 0xcd 100M 4M",
        f"write -P 0xef {2 * GiB + 64 * 1024} 1M",
        f"write -P 0x77 {3 * GiB - 64 * 1024} 64K",
    ],
)
VDB = DiskSpec("vdb", 1 * GiB, writes=["write -P 0x42 0 8M", "write -P 0x43 512M 4M"])
VDC_RAW = DiskSpec("vdc", 64 * MiB, fmt="raw", writes=["write -P 0x11 4M 1M"])


@pytest.fixture(scope="session")
def conn() -> Iterator[libvirt.virConnect]:
    connection = ensure_libvirtd()
    remove_leftovers(connection)
    yield connection
    remove_leftovers(connection)
    connection.close()


@pytest.fixture(scope="module")
def vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """A running VM with two qcow2 disks, one raw disk and an empty cdrom."""
    lab = create_vm(conn, [VDA, VDB, VDC_RAW])
    yield lab
    remove_vm(lab)


@pytest.fixture()
def small_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """A running VM with one small qcow2 disk, for tests that change its state."""
    lab = create_vm(conn, [DiskSpec("vda", 1 * GiB, writes=["write -P 0xab 0 4M"])], cdrom=False)
    yield lab
    remove_vm(lab)


@pytest.fixture()
def fresh_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """Like ``vm``, for tests that change the VM's state."""
    lab = create_vm(conn, [VDA, VDB, VDC_RAW])
    yield lab
    remove_vm(lab)


@pytest.fixture()
def uefi_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """A running VM booting UEFI: a loader and an NVRAM file to back up."""
    lab = create_vm(
        conn, [DiskSpec("vda", 1 * GiB, writes=["write -P 0x21 0 1M"])], cdrom=False, uefi=True
    )
    yield lab
    remove_vm(lab)


@pytest.fixture(scope="session")
def data_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """Enough incompressible data (256 MiB) that a backup or restore runs for a
    while; tests must leave it as they found it (no checkpoints, no job)."""
    lab = create_vm(conn, [DiskSpec("vda", 512 * MiB, random_mib=256)], cdrom=False)
    yield lab
    remove_vm(lab)


@pytest.fixture(scope="session")
def full_set(data_vm: LabVM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy backup of ``data_vm``, not to be changed."""
    out = tmp_path_factory.mktemp("set") / "backup"
    proc = run_tool("virtnbdbackup", "-d", data_vm.name, "-l", "copy", "-n", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def guest(conn: libvirt.virConnect) -> Iterator[Guest]:
    """The real Linux guest (scripts/build-test-guest.sh), booted once for
    the session: ext4 on vda and vdb (vdb with discard='unmap'), mounted
    on /mnt/vda and /mnt/vdb, qemu-guest-agent answering."""
    lab = create_guest(conn)
    try:
        lab.start()
        yield lab
    finally:
        remove_guest(lab)
