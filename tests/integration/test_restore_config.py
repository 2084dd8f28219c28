"""Restore with an adjusted domain XML that libvirt accepts and starts."""

from __future__ import annotations

from pathlib import Path

import libvirt

from libvirtnbdbackup.adapters.domainxml import parse_disks

from .vmlab import NAME_PREFIX, LabVM, destroy, images_identical, run_tool


def test_adjusted_config_defines_a_domain_that_starts(
    conn: libvirt.virConnect, fresh_vm: LabVM, tmp_path: Path
) -> None:
    vm = fresh_vm
    # Where the qemu user can reach the images, as under /var/lib/libvirt/images.
    out, restored = tmp_path / "backup", vm.folder / "restored"
    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "full", "-o", out, "-n")
    assert proc.returncode == 0, proc.stderr

    name = f"{NAME_PREFIX}restored-{vm.name[len(NAME_PREFIX) :]}"
    proc = run_tool("virtnbdrestore", "-i", out, "-o", restored, "-n", "-D", "-N", name)
    assert proc.returncode == 0, proc.stderr
    dom = conn.lookupByName(name)
    try:
        assert dom.UUIDString() != vm.dom.UUIDString()
        disks = {d.target: d for d in parse_disks(dom.XMLDesc(0))}
        # vdc (raw, not restored without --raw) and the cdrom are gone.
        assert sorted(disks) == ["vda", "vdb"]
        for target in ("vda", "vdb"):
            path = Path(disks[target].path or "")
            assert path.parent == restored.resolve() and disks[target].format == "qcow2"
            assert images_identical(vm.images[target], path)
        dom.create()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        destroy(dom)
    assert vm.state() == libvirt.VIR_DOMAIN_RUNNING, "the original domain is left alone"


def test_adjust_config_without_define_writes_the_xml_only(vm: LabVM, tmp_path: Path) -> None:
    out, restored = tmp_path / "backup", tmp_path / "restored"
    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "copy", "-i", "vdb", "-o", out, "-n")
    assert proc.returncode == 0, proc.stderr
    # No libvirtd is needed for that: the URI leads nowhere.
    nowhere = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    proc = run_tool("virtnbdrestore", "-i", out, "-o", restored, "-n", "-c", "-U", nowhere)
    assert proc.returncode == 0, proc.stderr
    failed = run_tool("virtnbdrestore", "-i", out, "-o", tmp_path / "d", "-n", "-D", "-U", nowhere)
    assert failed.returncode == 1 and "/nonexistent/libvirt-sock" in failed.stderr
    assert not (tmp_path / "d").exists(), "-D checks libvirt before restoring anything"
    xml = (restored / "vmconfig.xml").read_text()
    assert f"<name>restore_{vm.name}</name>" in xml and "<uuid>" not in xml
    assert [d.target for d in parse_disks(xml)] == ["vdb"]
