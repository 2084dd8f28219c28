"""Side files about the domain: autostart and guest OS information (as
2.47 saves them) and the swtpm state of an emulated TPM, put back by
``virtnbdrestore -D``."""

from __future__ import annotations

import contextlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from libvirtnbdbackup.jobs.guestfiles import tpm_state_folder

from .guestlab import Guest
from .vmlab import NAME_PREFIX, DiskSpec, GiB, backup_ok, create_vm, destroy, remove_vm, run_tool


def test_autostart_and_osinfo_are_saved_and_autostart_restored(
    conn: libvirt.virConnect, guest: Guest, tmp_path: Path
) -> None:
    out = tmp_path / "backup"
    guest.dom.setAutostart(1)
    try:
        backup_ok(guest.vm, out, "full")
    finally:
        guest.dom.setAutostart(0)
    assert (out / "autostart.virtnbdbackup.0").read_bytes() == b"True"
    info = json.loads((out / "osinfo.virtnbdbackup.0").read_text())
    assert info["kernel-release"] == guest.run("uname -r").strip()

    name = f"{NAME_PREFIX}restored-autostart"
    proc = run_tool("virtnbdrestore", "-i", out, "-o", tmp_path / "r", "-n", "-D", "-N", name)
    assert proc.returncode == 0, proc.stderr
    try:
        assert conn.lookupByName(name).autostart() == 1
    finally:
        destroy(conn.lookupByName(name))

    backup_ok(guest.vm, tmp_path / "plain", "copy")
    assert not (tmp_path / "plain" / "autostart.copy").exists()


def with_tpm(domain_xml: str) -> str:
    root = ET.fromstring(domain_xml)
    tpm = ET.SubElement(root.find("devices"), "tpm", model="tpm-crb")  # type: ignore[arg-type]
    ET.SubElement(tpm, "backend", type="emulator", version="2.0")
    return ET.tostring(root, encoding="unicode")


def test_tpm_state_is_saved_with_each_backup_and_put_back_by_define(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    vm = create_vm(
        conn, [DiskSpec("vda", 1 * GiB, writes=["write -P 0x5 0 1M"])], cdrom=False, start=False
    )
    restored = f"{NAME_PREFIX}restored-tpm"
    try:
        vm.dom = conn.defineXML(with_tpm(vm.dom.XMLDesc(0)))
        try:
            vm.dom.create()
        except libvirt.libvirtError as err:
            pytest.fail(f"a domain with an swtpm TPM does not start here: {err}")
        state = tpm_state_folder(vm.dom.UUIDString())
        permall = next(state.rglob("*.permall"))
        out = tmp_path / "backup"
        backup_ok(vm, out, "full")
        assert (out / "tpm.virtnbdbackup.0.tar").is_file()
        backup_ok(vm, out, "inc")
        assert (out / "tpm.virtnbdbackup.1.tar").is_file()
        vm.dom.destroy()  # swtpm writes its state as the domain stops
        source = permall.read_bytes()

        backup_ok(vm, tmp_path / "offline", "copy")
        proc = run_tool(
            "virtnbdrestore",
            "-i",
            tmp_path / "offline",
            "-o",
            vm.folder / "r",
            "-n",
            "-D",
            "-N",
            restored,
        )
        assert proc.returncode == 0, proc.stderr
        new_uuid = conn.lookupByName(restored).UUIDString()
        copy = tpm_state_folder(new_uuid) / permall.relative_to(state)
        assert copy.read_bytes() == source
        conn.lookupByName(restored).create()  # swtpm starts on the restored state
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            destroy(conn.lookupByName(restored))
        remove_vm(vm)
