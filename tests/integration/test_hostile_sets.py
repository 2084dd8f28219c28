"""Backup sets made to write outside the output folder or to read outside
their own: each is refused with exit 1, and nothing is written out there.

The sets are written by hand with the stream writer: a hostile set is data
anyone may have put into a backup folder, not something our backup makes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from libvirtnbdbackup.format.meta import StreamMeta
from libvirtnbdbackup.format.writer import StreamWriter

from .vmlab import OVMF_CODE, run_tool

SIZE = 1 << 20


def write_set(folder: Path, disk_name: str, file_name: str = "vda.full.data") -> Path:
    """A one-file full backup whose meta names ``disk_name``."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = StreamMeta(
        virtual_size=SIZE,
        data_size=4096,
        disk_name=disk_name,
        disk_format="qcow2",
        checkpoint_name="virtnbdbackup.0",
        parent_checkpoint="",
        incremental=False,
        compressed=False,
    )
    path = folder / file_name
    with open(path, "wb") as fh:
        writer = StreamWriter(fh, meta)
        writer.data(0, 4096, [b"\x5a" * 4096])
        writer.finish()
    return path


def vmconfig(folder: Path, loader: str, image: str = "/var/lib/libvirt/images/vm.qcow2") -> None:
    (folder / "vmconfig.virtnbdbackup.0.xml").write_text(
        f"""<domain type='kvm'><name>hostile</name>
        <os><type arch='x86_64' machine='q35'>hvm</type>
        <loader readonly='yes' type='pflash'>{loader}</loader></os>
        <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{image}'/><target dev='vda' bus='virtio'/></disk></devices>
        </domain>"""
    )


def refused(proc_args: list[str | Path], *, expect: str) -> str:
    # A map that is not refused would serve until stopped: the timeout ends it.
    proc = run_tool(*[str(a) for a in proc_args], timeout=60)  # type: ignore[arg-type]
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expect in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


@pytest.mark.parametrize("escape", ["../../../../x", "/ABS/x", "..", ".hidden"])
def test_disk_name_that_leaves_the_output_folder_refuses_the_set(
    tmp_path: Path, escape: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    name = escape.replace("/ABS", str(outside))
    backup, out = tmp_path / "set", tmp_path / "out" / "a" / "b" / "c" / "d"
    write_set(backup, name)
    refused(["virtnbdrestore", "-i", backup, "-o", out, "-n"], expect="not a plain file name")
    assert not list(outside.iterdir())
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p.parent != backup)
    # virtnbdmap takes its sockets and overlays from the same names.
    refused(["virtnbdmap", "-i", backup, "--listen", f"unix:{tmp_path}/s"], expect="plain file")


def test_image_name_from_the_domain_xml_is_one_component(tmp_path: Path) -> None:
    backup, out = tmp_path / "set", tmp_path / "out"
    write_set(backup, "vda")
    vmconfig(backup, str(OVMF_CODE), image="/var/lib/libvirt/images/..")
    refused(["virtnbdrestore", "-i", backup, "-o", out, "-n"], expect="not a plain file name")
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "out.partial").exists()


def test_boot_file_symlinked_out_of_the_set_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    backup, out = tmp_path / "set", tmp_path / "out"
    write_set(backup, "vda")
    vmconfig(backup, str(OVMF_CODE))
    (backup / f"{OVMF_CODE.name}.virtnbdbackup.0").symlink_to(secret)
    refused(["virtnbdrestore", "-i", backup, "-o", out, "-n"], expect="outside the backup folder")
    copies = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not any(p.read_bytes() == secret.read_bytes() for p in copies)


def test_data_file_symlinked_out_of_the_set_is_not_read(tmp_path: Path) -> None:
    elsewhere = write_set(tmp_path / "elsewhere", "vda")
    backup = tmp_path / "set"
    backup.mkdir()
    (backup / "vda.full.data").symlink_to(elsewhere)
    refused(
        ["virtnbdrestore", "-i", backup, "-o", tmp_path / "out", "-n"],
        expect="outside the backup folder",
    )
    # A symlink that stays inside the folder is followed as before.
    os.rename(elsewhere, backup / "real.data.orig")
    (backup / "vda.full.data").unlink()
    (backup / "vda.full.data").symlink_to("real.data.orig")
    proc = run_tool("virtnbdrestore", "-i", backup, "-o", tmp_path / "out", "-n")
    assert proc.returncode == 0, proc.stderr


def test_qcow_json_symlinked_out_is_refused(tmp_path: Path) -> None:
    backup = tmp_path / "set"
    write_set(backup, "vda")
    (tmp_path / "info.json").write_text(json.dumps({"format": "qcow2"}))
    (backup / "vda.virtnbdbackup.0.qcow.json").symlink_to(tmp_path / "info.json")
    refused(
        ["virtnbdrestore", "-i", backup, "-o", tmp_path / "out", "-n"],
        expect="outside the backup folder",
    )
