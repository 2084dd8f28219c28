"""Side files about the domain saved with each backup, as 2.47 saves them:
``autostart.<ident>`` (the domain starts with the host), ``osinfo.<ident>``
(the guest agent's guest-get-osinfo) and, for Windows guests, the BitLocker
recovery keys (``bitlocker.<ident>``). Beyond 2.47: ``tpm.<ident>.tar``,
the swtpm state folder of a domain with an emulated TPM.

None of them is needed to restore the disks: a file that cannot be made
costs a log line, never the backup.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from ..adapters.guestagent import GuestAgent
from ..errors import AgentError

log = logging.getLogger(__name__)

SWTPM_STATE_ROOT = Path("/var/lib/libvirt/swtpm")
MANAGE_BDE = "C:\\Windows\\System32\\manage-bde.exe"


def autostart_file(ident: str) -> str:
    return f"autostart.{ident}"


def tpm_file(ident: str) -> str:
    return f"tpm.{ident}.tar"


def agent_files(agent: GuestAgent, ident: str) -> Iterator[tuple[str, bytes]]:
    """osinfo, and BitLocker keys for Windows, from a guest agent that answers."""
    try:
        info = agent.os_info()
    except AgentError as err:
        log.info("guest OS information not saved: %s", err)
        return
    yield f"osinfo.{ident}", json.dumps(info, indent=4).encode()
    if info.get("id") == "mswindows":
        keys = bitlocker_keys(agent)
        if keys:
            yield f"bitlocker.{ident}", keys.encode()


def bitlocker_keys(agent: GuestAgent) -> str:
    """``manage-bde -protectors -get`` of each drive of a Windows guest that
    BitLocker protects: what unlocks it when the TPM no longer does."""
    try:
        drives = sorted(
            {
                str(fs["mountpoint"])[:2].upper()
                for fs in agent.filesystems()
                if len(str(fs.get("mountpoint", ""))) >= 2 and str(fs["mountpoint"])[1] == ":"
            }
        )
    except AgentError as err:
        log.warning("BitLocker recovery keys not saved: %s", err)
        return ""
    found = []
    for drive in drives:
        try:
            result = agent.run(MANAGE_BDE, ["-protectors", "-get", drive])
        except AgentError as err:
            log.warning("BitLocker recovery keys of drive %s not saved: %s", drive, err)
            continue
        if result.exitcode == 0 and "Numerical Password" in result.stdout:
            found.append(f"=== {drive}\n{result.stdout.strip()}\n")
            log.info("saved the BitLocker recovery keys of drive %s", drive)
        else:
            log.debug("drive %s: no BitLocker protectors (%s)", drive, result.exitcode)
    return "\n".join(found)


def has_emulated_tpm(domain_xml: str) -> bool:
    backend = ET.fromstring(domain_xml).find("./devices/tpm/backend")
    return backend is not None and backend.get("type") == "emulator"


def tpm_state_folder(uuid: str) -> Path:
    return SWTPM_STATE_ROOT / uuid


def tpm_archive(uuid: str) -> bytes | None:
    """The domain's swtpm state folder as an uncompressed tar, None if it has none."""
    folder = tpm_state_folder(uuid)
    if not folder.is_dir():
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                path = Path(root) / name
                tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buffer.getvalue()


def restore_tpm_state(archive: Path, uuid: str) -> Path:
    """Put a saved swtpm state folder back for the domain of ``uuid``
    (libvirt gives the files to its swtpm user as the domain starts)."""
    dest = tpm_state_folder(uuid)
    partial = dest.with_name(dest.name + ".partial")
    if dest.exists():
        raise FileExistsError(f"{dest} exists: not overwriting a TPM state")
    partial.mkdir(parents=True, mode=0o711)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                name = Path(member.name)
                if (
                    name.is_absolute()
                    or ".." in name.parts
                    or not (member.isfile() or member.isdir())
                ):
                    raise ValueError(f"{archive.name}: unexpected entry {member.name!r}")
            tar.extractall(partial, members=members)
        os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest
