"""What a libvirt domain XML says about disks and boot files."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Disk:
    target: str  # device name in the guest, e.g. "vda"; also the NBD export name
    device: str  # disk, cdrom, floppy or lun
    source_type: str  # file, block, network, volume
    format: str  # qcow2, raw, ...
    path: str | None  # source file or block device, None for an empty drive

    @property
    def is_local_image(self) -> bool:
        return self.source_type in ("file", "block") and self.path is not None


@dataclass(frozen=True)
class SkippedDisk:
    disk: Disk
    reason: str


@dataclass(frozen=True)
class DiskSelection:
    selected: list[Disk]
    skipped: list[SkippedDisk]


def parse_disks(domain_xml: str) -> list[Disk]:
    root = ET.fromstring(domain_xml)
    disks = []
    for node in root.findall("./devices/disk"):
        target = node.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = node.find("driver")
        source = node.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name")
        disks.append(
            Disk(
                target=target.get("dev", ""),
                device=node.get("device", "disk"),
                source_type=node.get("type", "file"),
                format=(driver.get("type") if driver is not None else None) or "raw",
                path=path,
            )
        )
    return disks


def split_names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def select_disks(
    disks: list[Disk], *, include: list[str], exclude: list[str], raw: bool
) -> DiskSelection:
    """Pick the disks to back up, with the reason each other one is left out."""
    known = {d.target for d in disks}
    unknown = [name for name in include + exclude if name not in known]
    if unknown:
        raise UsageError(
            f"no disk named {', '.join(unknown)} in this domain; "
            f"its disks are: {', '.join(sorted(known)) or 'none'}"
        )
    selected: list[Disk] = []
    skipped: list[SkippedDisk] = []
    for disk in disks:
        reason = None
        if include and disk.target not in include:
            reason = "not named by --include"
        elif disk.target in exclude:
            reason = "excluded by --exclude"
        elif disk.device in ("cdrom", "floppy"):
            reason = f"{disk.device} drives are not backed up"
        elif disk.device == "lun":
            reason = "direct-attached LUNs have no changed block tracking"
        elif disk.path is None:
            reason = "the drive has no source"
        elif disk.format == "raw" and not raw:
            reason = "raw images are only backed up with --raw"
        if reason:
            skipped.append(SkippedDisk(disk, reason))
        else:
            selected.append(disk)
    return DiskSelection(selected, skipped)


def boot_files(domain_xml: str) -> list[str]:
    """Loader, NVRAM, kernel and initrd files the domain boots from."""
    root = ET.fromstring(domain_xml)
    files = []
    for tag in ("loader", "nvram", "kernel", "initrd"):
        node = root.find(f"./os/{tag}")
        if node is not None and node.text and node.text.strip():
            files.append(node.text.strip())
    return files


def disk_sources(domain_xml: str) -> dict[str, str]:
    """Map of disk target to its source path, for the disks that have one."""
    return {d.target: d.path for d in parse_disks(domain_xml) if d.path}


def adjust_config(
    domain_xml: str,
    *,
    name: str,
    images: dict[str, tuple[str, str]],
    boot: dict[str, str],
) -> str:
    """The domain XML of a backup, made to run from restored images.

    ``images`` maps each restored disk target to its (path, format); every
    other disk, and cdrom and floppy drives, are dropped. ``boot`` maps
    original loader/nvram/kernel/initrd paths to their restored copies. The
    UUID goes, so libvirt assigns a new one and the original domain stays.
    """
    root = ET.fromstring(domain_xml)
    root.find("name").text = name  # type: ignore[union-attr]
    for tag in ("uuid", "id"):
        for node in root.findall(tag):
            root.remove(node)
    root.attrib.pop("id", None)
    devices = root.find("devices")
    for node in list(devices) if devices is not None else []:
        if node.tag != "disk":
            continue
        target = node.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in images or node.get("device") in ("cdrom", "floppy"):
            devices.remove(node)  # type: ignore[union-attr]
            continue
        path, fmt = images[dev]
        node.set("type", "file")
        for child in list(node):
            if child.tag in ("source", "backingStore"):
                node.remove(child)
        source = ET.Element("source", file=path)
        node.insert(1, source)
        driver = node.find("driver")
        if driver is None:
            driver = ET.SubElement(node, "driver", name="qemu")
        driver.set("type", fmt)
    for tag in ("loader", "nvram", "kernel", "initrd"):
        elem = root.find(f"./os/{tag}")
        if elem is not None and elem.text and elem.text.strip() in boot:
            elem.text = boot[elem.text.strip()]
    return ET.tostring(root, encoding="unicode")


def qemu_owner(domain_xml: str) -> str | None:
    """``UID:GID`` (or ``USER:GROUP``) QEMU runs as, from the DAC label of a
    running domain's XML; None when libvirt reports none."""
    root = ET.fromstring(domain_xml)
    for label in root.findall("./seclabel[@model='dac']/label"):
        text = (label.text or "").strip()
        if ":" in text:
            return ":".join(part.lstrip("+") for part in text.split(":", 1))
    return None
