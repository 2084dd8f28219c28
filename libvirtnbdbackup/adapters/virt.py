"""libvirt: connection, domain state, checkpoints and pull-mode backup jobs."""

from __future__ import annotations

import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import libvirt

from ..errors import DomainError
from .domainxml import Disk, parse_disks
from .guestagent import GuestAgent
from .nbdclient import NbdAddress

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "virtnbdbackup"
# Namespace of the domain metadata element that holds a domain's fleet tags:
#   <metadata><fleet xmlns="urn:virtnbdbackup:fleet"><tag>nightly</tag></fleet></metadata>
FLEET_METADATA_NS = "urn:virtnbdbackup:fleet"

# libvirt prints every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _message(err: libvirt.libvirtError) -> str:
    return err.get_error_message() or str(err)


class Hypervisor:
    def __init__(self, uri: str, user: str | None = None, password: str | None = None) -> None:
        self.uri = uri
        try:
            if user or password:
                self._conn = libvirt.openAuth(uri, self._auth(user, password), 0)
            else:
                self._conn = libvirt.open(uri)
        except libvirt.libvirtError as err:
            raise DomainError(
                f"cannot connect to libvirt at {uri}: {_message(err)} "
                "(is libvirtd running, and may this user use it?)"
            ) from None

    @staticmethod
    def _auth(user: str | None, password: str | None) -> list[Any]:
        def answer(credentials: list[list[Any]], _data: object) -> int:
            for cred in credentials:
                if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                    cred[4] = user
                elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                    cred[4] = password
            return 0

        return [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None]

    @property
    def library_version(self) -> str:
        v = libvirt.getVersion()
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    def define(self, domain_xml: str) -> None:
        try:
            self._conn.defineXML(domain_xml)
        except libvirt.libvirtError as err:
            raise DomainError(f"libvirt refused the restored domain: {_message(err)}") from None

    def start_transient(self, domain_xml: str) -> Domain:
        """Create and start a domain that libvirt forgets once it stops."""
        try:
            return Domain(self._conn.createXML(domain_xml, 0))
        except libvirt.libvirtError as err:
            raise DomainError(f"libvirt cannot start the domain: {_message(err)}") from None

    def domain(self, name: str) -> Domain:
        try:
            return Domain(self._conn.lookupByName(name))
        except libvirt.libvirtError as err:
            raise DomainError(f"domain {name!r} not found at {self.uri}: {_message(err)}") from None

    def list_domains(self) -> list[DomainSummary]:
        """Every domain libvirt knows, running or not, with what selecting
        it needs; a domain that vanishes while being listed is left out."""
        try:
            doms = self._conn.listAllDomains(0)
        except libvirt.libvirtError as err:
            raise DomainError(f"cannot list the domains at {self.uri}: {_message(err)}") from None
        found = []
        for dom in doms:
            try:
                xml = dom.XMLDesc(0)
                found.append(
                    DomainSummary(
                        name=dom.name(),
                        uuid=dom.UUIDString(),
                        active=bool(dom.isActive()),
                        disks=sum(1 for d in parse_disks(xml) if d.device == "disk"),
                        tags=fleet_tags(xml),
                    )
                )
            except libvirt.libvirtError as err:
                log.debug("domain left out of the listing: %s", _message(err))
        return sorted(found, key=lambda d: d.name)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()


@dataclass(frozen=True)
class DomainSummary:
    name: str
    uuid: str
    active: bool
    disks: int  # devices of type disk (each needs an NBD port when backed up offline)
    tags: tuple[str, ...]


def fleet_tags(domain_xml: str) -> tuple[str, ...]:
    """The tags in the domain's fleet metadata element, in document order."""
    root = ET.fromstring(domain_xml)
    tags: list[str] = []
    for node in root.findall(f"./metadata/{{{FLEET_METADATA_NS}}}fleet/{{{FLEET_METADATA_NS}}}tag"):
        text = (node.text or "").strip()
        if text and text not in tags:
            tags.append(text)
    return tuple(tags)


class Domain:
    def __init__(self, dom: libvirt.virDomain) -> None:
        self._dom = dom
        self.name: str = dom.name()

    def is_running(self) -> bool:
        state, _reason = self._dom.state()
        return state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)

    def is_paused(self) -> bool:
        state, _reason = self._dom.state()
        return bool(state == libvirt.VIR_DOMAIN_PAUSED)

    def agent(self) -> GuestAgent:
        return GuestAgent(self._dom)

    def autostart(self) -> bool:
        return bool(self._call("read the autostart flag", self._dom.autostart))

    def set_autostart(self) -> None:
        self._call("mark the domain for autostart", self._dom.setAutostart, 1)

    def uuid(self) -> str:
        return str(self._call("read the UUID", self._dom.UUIDString))

    def start_paused(self) -> None:
        self._call("start the domain", self._dom.createWithFlags, libvirt.VIR_DOMAIN_START_PAUSED)

    def destroy(self) -> None:
        self._call("stop the domain", self._dom.destroy)

    def suspend(self) -> None:
        self._call("pause the domain", self._dom.suspend)

    def resume(self) -> None:
        self._call("resume the domain", self._dom.resume)

    def xml(self) -> str:
        return self._call("read the domain XML", self._dom.XMLDesc, 0)

    def checkpoint_names(self) -> list[str]:
        cps = self._call("list checkpoints", self._dom.listAllCheckpoints, 0)
        return [cp.getName() for cp in cps]

    def checkpoint_xml(self, name: str, *, size: bool = False) -> str:
        """The checkpoint's XML; with ``size`` the bytes changed since, per disk
        (as 2.x saves it), where libvirt can tell."""
        cp = self._call(f"find checkpoint {name}", self._dom.checkpointLookupByName, name)
        if size:
            try:
                return str(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE))
            except libvirt.libvirtError as err:
                log.info("checkpoint %s: no size information (%s)", name, _message(err))
        return self._call(f"read checkpoint {name}", cp.getXMLDesc, 0)

    def delete_checkpoint(self, name: str) -> None:
        """Delete a checkpoint and its bitmaps; only its metadata if they are gone."""
        cp = self._call(f"find checkpoint {name}", self._dom.checkpointLookupByName, name)
        try:
            cp.delete(0)
        except libvirt.libvirtError as err:
            if "bitmap" not in _message(err):
                raise DomainError(
                    f"domain {self.name}: cannot delete checkpoint {name}: {_message(err)}"
                ) from None
            log.warning(
                "checkpoint %s has no bitmap left (%s): removing its metadata only",
                name,
                _message(err),
            )
            flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
            self._call(f"delete checkpoint {name}", cp.delete, flags)

    def redefine_checkpoint(self, xml: str) -> None:
        """Recreate lost checkpoint metadata; fails if a bitmap is not in its image."""
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        if self.is_running():
            flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        self._call("redefine a checkpoint", self._dom.checkpointCreateXML, xml, flags)

    def remove_orphan_bitmap(
        self, name: str, disks: list[Disk], all_disks: list[Disk]
    ) -> list[str]:
        """Remove bitmap ``name`` that QEMU holds without a libvirt checkpoint.

        libvirt only removes bitmaps through checkpoints: each disk gets a
        checkpoint redefined (validated, so only disks that hold the bitmap),
        which is then deleted with its bitmap. Returns the disks cleaned.
        """
        cleaned = []
        for disk in disks:
            xml = checkpoint_xml(name, [disk], all_disks, created=int(time.time()))
            try:
                self.redefine_checkpoint(xml)
            except DomainError:
                continue  # this disk has no such bitmap
            self.delete_checkpoint(name)
            cleaned.append(disk.target)
        return cleaned

    def checkpoint_sizes(self, name: str) -> dict[str, int]:
        """Bytes changed since checkpoint ``name``, per disk with a bitmap.

        QEMU answers from the bitmaps themselves, so this fails when one is
        missing or was left inconsistent by a crash.
        """
        cp = self._call(f"find checkpoint {name}", self._dom.checkpointLookupByName, name)
        xml = self._call(
            f"read the bitmaps of checkpoint {name}",
            cp.getXMLDesc,
            libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE,
        )
        root = ET.fromstring(xml)
        return {
            node.get("name", ""): int(node.get("size", "0"))
            for node in root.findall("./disks/disk")
            if node.get("checkpoint") == "bitmap"
        }

    def allocation(self, target: str) -> int:
        """Bytes the host stores for disk ``target``: what a full backup of
        it writes, give or take the image's metadata (its backing images
        not counted)."""
        info = self._call(f"read the size of disk {target}", self._dom.blockInfo, target)
        return int(info[1])

    def begin_backup(self, backup_xml: str, checkpoint_xml: str | None) -> None:
        self._call("start the backup job", self._dom.backupBegin, backup_xml, checkpoint_xml, 0)

    def has_backup_job(self) -> bool:
        try:
            stats = self._dom.jobStats(0)
        except libvirt.libvirtError:
            return False
        return stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP and stats.get(
            "type", libvirt.VIR_DOMAIN_JOB_NONE
        ) not in (libvirt.VIR_DOMAIN_JOB_NONE, libvirt.VIR_DOMAIN_JOB_COMPLETED)

    def backup_job_xml(self) -> str | None:
        """The XML of the backup job running, or None."""
        try:
            return str(self._dom.backupGetXMLDesc(0))
        except libvirt.libvirtError:
            return None

    def abort_job(self) -> None:
        self._call("stop the backup job", self._dom.abortJob)

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except libvirt.libvirtError as err:
            raise DomainError(f"domain {self.name}: cannot {what}: {_message(err)}") from None


def own_checkpoints(names: Iterable[str]) -> list[str]:
    """Our checkpoints (``virtnbdbackup.N``), newest first."""
    ours = []
    for name in names:
        prefix, _, number = name.rpartition(".")
        if prefix == CHECKPOINT_PREFIX and number.isdigit():
            ours.append((int(number), name))
    return [name for _, name in sorted(ours, reverse=True)]


def backup_xml(
    backup_disks: list[Disk],
    all_disks: list[Disk],
    server: NbdAddress,
    scratch: dict[str, str],
    incremental: str | None = None,
    bind: str | None = None,
) -> str:
    """A pull-mode backup job whose NBD server listens at ``server``: its
    unix socket, or TCP on address ``bind`` (TLS if ``server.tls_dir``)."""
    root = ET.Element("domainbackup", mode="pull")
    if incremental:
        ET.SubElement(root, "incremental").text = incremental
    if server.socket:
        ET.SubElement(root, "server", transport="unix", socket=server.socket)
    else:
        attrs = {"transport": "tcp", "name": bind or server.host or "", "port": str(server.port)}
        if server.tls_dir:
            attrs["tls"] = "yes"  # certificates: qemu.conf backup_tls_x509_cert_dir
        ET.SubElement(root, "server", attrs)
    disks = ET.SubElement(root, "disks")
    chosen = {d.target for d in backup_disks}
    for disk in all_disks:
        if disk.target in chosen:
            node = ET.SubElement(disks, "disk", name=disk.target, backup="yes", type="file")
            ET.SubElement(node, "scratch", file=scratch[disk.target])
        else:
            ET.SubElement(disks, "disk", name=disk.target, backup="no")
    return ET.tostring(root, encoding="unicode")


CHECKPOINT_DESCRIPTION = "Backup checkpoint"  # what 2.x writes


def checkpoint_xml(
    name: str, bitmap_disks: list[Disk], all_disks: list[Disk], created: int | None = None
) -> str:
    """A new checkpoint; with ``created`` (epoch), the minimal XML libvirt redefines."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "description").text = CHECKPOINT_DESCRIPTION
    ET.SubElement(root, "name").text = name
    if created is not None:
        ET.SubElement(root, "creationTime").text = str(created)
    disks = ET.SubElement(root, "disks")
    chosen = {d.target for d in bitmap_disks}
    for disk in all_disks:
        mode = "bitmap" if disk.target in chosen else "no"
        ET.SubElement(disks, "disk", name=disk.target, checkpoint=mode)
    return ET.tostring(root, encoding="unicode")
