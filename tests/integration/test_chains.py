"""Backup chains: full, incrementals and a differential, restored at every point.

The VM's disk gets writes (and a discard) through QEMU while it runs; a
reference image gets the same content offline with qemu-io, and a copy of it
is kept at every backup, so each point in time has its expected image.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from libvirtnbdbackup.format.frames import Kind
from libvirtnbdbackup.format.reader import StreamReader, read_meta

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

INITIAL = ["write -P 0xab 0 2M", "write -P 0xac 300M 1M"]

# Per step: the live writes, and how the reference reaches the same content.
STEPS: list[list[tuple[str, str]]] = [
    [  # before inc 1: new data, data over the full backup's data, a discard
        ("write -P 0x11 10M 2M", "write -P 0x11 10M 2M"),
        ("write -P 0x12 300M 64K", "write -P 0x12 300M 64K"),
        ("discard 0 1M", "write -z 0 1M"),
        ("write -P 0x13 1023M 1M", "write -P 0x13 1023M 1M"),
    ],
    [  # before inc 2: overlapping the last increment
        ("write -P 0x21 11M 2M", "write -P 0x21 11M 2M"),
        ("write -P 0x22 700M 3M", "write -P 0x22 700M 3M"),
    ],
    [  # before inc 3: a write and a discard of what inc 1 saved
        ("write -P 0x31 512M 1M", "write -P 0x31 512M 1M"),
        ("discard 10M 1M", "write -z 10M 1M"),
    ],
    [  # before the differential
        ("write -P 0x41 100M 4M", "write -P 0x41 100M 4M"),
        ("write -P 0x42 12M 64K", "write -P 0x42 12M 64K"),
    ],
]


@pytest.fixture()
def chain_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    lab = create_vm(conn, [DiskSpec("vda", 1 * GiB, writes=INITIAL)], cdrom=False)
    yield lab
    remove_vm(lab)


def restore_and_compare(out: Path, dest: Path, expected: Path, *args: str) -> None:
    restored = restore_image(out, dest, *args)
    assert images_identical(expected, restored), f"{args}: restored image differs"


@pytest.mark.parametrize("compress", [[], ["-z"]], ids=["plain", "lz4"])
def test_full_incs_and_diff_restore_at_every_point(
    chain_vm: LabVM, tmp_path: Path, compress: list[str]
) -> None:
    vm = chain_vm
    out = tmp_path / "backup"
    reference = tmp_path / "reference.qcow2"
    sh("qemu-img", "convert", "-U", "-O", "qcow2", vm.images["vda"], reference)
    expected: dict[str, Path] = {}

    def keep(name: str) -> None:
        expected[name] = tmp_path / f"expected.{name}.qcow2"
        shutil.copyfile(reference, expected[name])

    backup_ok(vm, out, "full", *compress)
    keep("virtnbdbackup.0")
    for number, step in enumerate(STEPS, start=1):
        for live, offline in step:
            hmp_io(vm, "vda", live)
            sh("qemu-io", "-f", "qcow2", "-c", offline, reference)
        if number < len(STEPS):
            backup_ok(vm, out, "inc", *compress)
            keep(f"virtnbdbackup.{number}")
        else:
            backup_ok(vm, out, "diff", *compress)
            keep("latest")

    names = sorted(p.name for p in out.glob("*.data"))
    diff = [n for n in names if ".diff." in n]
    assert [n for n in names if n not in diff] == [
        "vda.full.data",
        "vda.inc.virtnbdbackup.1.data",
        "vda.inc.virtnbdbackup.2.data",
        "vda.inc.virtnbdbackup.3.data",
    ] and len(diff) == 1
    epoch = diff[0].split(".")[2]
    assert (out / f"vmconfig.{epoch}.xml").is_file()
    assert json.loads((out / f"{vm.name}.cpt").read_text()) == [
        f"virtnbdbackup.{n}" for n in range(4)
    ]
    assert vm.checkpoints() == [f"virtnbdbackup.{n}" for n in range(4)]
    inc1 = read_meta(str(out / "vda.inc.virtnbdbackup.1.data"))
    assert (inc1.checkpoint_name, inc1.parent_checkpoint, inc1.incremental) == (
        "virtnbdbackup.1",
        "virtnbdbackup.0",
        True,
    )
    meta = read_meta(str(out / diff[0]))
    assert (meta.checkpoint_name, meta.parent_checkpoint) == ("virtnbdbackup.4", "virtnbdbackup.3")
    # Increments are thin: about the data written, not the disk.
    assert (out / "vda.inc.virtnbdbackup.2.data").stat().st_size < 6 * 1024**2

    # As the format says and 2.47's map needs: incremental files hold data
    # frames only; what the guest discarded is in their .zeros side files.
    for path in out.glob("vda.*.data"):
        if ".full." in path.name:
            continue
        with open(path, "rb") as fh:
            kinds = {frame.kind for frame in StreamReader(fh, path.name).frames()}
        assert kinds <= {Kind.DATA}, (path.name, kinds)
        assert Path(f"{path}.zeros").is_file(), path.name
    zeros = json.loads((out / "vda.inc.virtnbdbackup.1.data.zeros").read_text())["zeros"]
    assert [0, 1024**2] in zeros  # "discard 0 1M" before inc 1

    for name in ("virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2", "virtnbdbackup.3"):
        restore_and_compare(out, tmp_path / f"until-{name}", expected[name], "--until", name)
    restore_and_compare(out, tmp_path / "latest", expected["latest"])
    for index in out.glob("*.idx"):  # the extents rebuilt from the headers and .zeros
        index.unlink()
    restore_and_compare(out, tmp_path / "latest-no-idx", expected["latest"])
    if compress:  # and into an image of compressed clusters
        packed = restore_image(out, tmp_path / "packed", "--compress")
        assert images_identical(expected["latest"], packed)
        check = json.loads(sh("qemu-img", "check", "--output=json", packed).stdout)
        assert check["compressed-clusters"] > 0
        assert not list((tmp_path / "packed").glob("*.partial"))
    restore_and_compare(
        out, tmp_path / "until-diff", expected["latest"], "--until", "virtnbdbackup.4"
    )
    restore_and_compare(
        out,
        tmp_path / "sequence",
        expected["virtnbdbackup.1"],
        "--sequence",
        "vda.full.data,vda.inc.virtnbdbackup.1.data",
    )

    bad = run_tool(
        "virtnbdrestore",
        "-i",
        out,
        "-o",
        tmp_path / "bad",
        "--sequence",
        "vda.full.data,vda.inc.virtnbdbackup.2.data",
    )
    assert bad.returncode == 1 and "builds on checkpoint virtnbdbackup.1" in bad.stderr
    (out / "vda.inc.virtnbdbackup.2.data").unlink()
    broken = run_tool("virtnbdrestore", "-i", out, "-o", tmp_path / "broken")
    assert broken.returncode == 1
    # The manifest of that inc names the file that is gone.
    assert "wrote vda.inc.virtnbdbackup.2.data, which is missing" in broken.stderr


def test_auto_takes_full_then_inc(chain_vm: LabVM, tmp_path: Path) -> None:
    vm = chain_vm
    out = tmp_path / "month"
    backup_ok(vm, out, "auto")
    assert (out / "vda.full.data").is_file()
    hmp_io(vm, "vda", "write -P 0x99 40M 1M")
    backup_ok(vm, out, "auto")
    assert (out / "vda.inc.virtnbdbackup.1.data").is_file()
    assert read_meta(str(out / "vda.inc.virtnbdbackup.1.data")).data_size == 1024**2


def test_inc_refuses_without_full_or_after_failed_backup(chain_vm: LabVM, tmp_path: Path) -> None:
    vm = chain_vm
    empty = run_tool("virtnbdbackup", "-d", vm.name, "-l", "inc", "-o", tmp_path / "e", "-n")
    assert empty.returncode == 1 and "take a full backup first" in empty.stderr

    out = tmp_path / "backup"
    backup_ok(vm, out, "full")
    (out / "vda.inc.virtnbdbackup.1.data.partial").write_bytes(b"left over")
    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "inc", "-o", out, "-n")
    assert proc.returncode == 1 and "unfinished files" in proc.stderr
    assert vm.checkpoints() == ["virtnbdbackup.0"]
