"""The side files made from the guest agent, against recorded agent replies
of a Windows guest with one BitLocker drive, and the TPM state archive."""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

import pytest

from libvirtnbdbackup.adapters.guestagent import GuestAgent
from libvirtnbdbackup.jobs import guestfiles

from .test_guestagent import Recorded

PROTECTORS_C = """\
BitLocker Drive Encryption: Configuration Tool version 10.0.22621
Copyright (C) 2013 Microsoft Corporation. All rights reserved.

Volume C: []
All Key Protectors

    TPM:
      ID: {6C9D8B1A-0F4E-4C63-9C1D-3B7E2A5F8D10}

    Numerical Password:
      ID: {2F3E4D5C-6B7A-4890-A1B2-C3D4E5F60718}
      Password:
        123456-234567-345678-456789-567890-678901-789012-890123
"""
NOT_ENCRYPTED_D = "ERROR: An error occurred (code 0x80310000):\nThis drive is not encrypted.\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


WINDOWS_REPLIES: list[dict[str, object]] = [
    {"return": {"id": "mswindows", "name": "Microsoft Windows", "version": "11"}},
    {
        "return": [
            {"name": "\\\\?\\Volume{a}\\", "mountpoint": "C:\\", "type": "NTFS"},
            {"name": "\\\\?\\Volume{b}\\", "mountpoint": "D:\\", "type": "NTFS"},
            {"name": "\\\\?\\Volume{c}\\", "mountpoint": "", "type": "FAT32"},
        ]
    },
    {"return": {"pid": 4012}},
    {"return": {"exited": True, "exitcode": 0, "out-data": b64(PROTECTORS_C)}},
    {"return": {"pid": 4013}},
    {"return": {"exited": True, "exitcode": -1, "out-data": b64(NOT_ENCRYPTED_D)}},
]


def test_a_windows_guest_gets_osinfo_and_the_recovery_keys_of_its_bitlocker_drives() -> None:
    transport = Recorded(WINDOWS_REPLIES)
    files = dict(guestfiles.agent_files(GuestAgent(None, transport), "virtnbdbackup.3"))  # type: ignore[arg-type]
    assert sorted(files) == ["bitlocker.virtnbdbackup.3", "osinfo.virtnbdbackup.3"]
    assert json.loads(files["osinfo.virtnbdbackup.3"])["id"] == "mswindows"
    keys = files["bitlocker.virtnbdbackup.3"].decode()
    assert keys.startswith("=== C:\n")
    assert "123456-234567-345678-456789-567890-678901-789012-890123" in keys
    assert "=== D:" not in keys
    execs = [r["arguments"] for r in transport.requests if r["execute"] == "guest-exec"]
    assert [e["arg"] for e in execs] == [
        ["-protectors", "-get", "C:"],
        ["-protectors", "-get", "D:"],
    ]  # type: ignore[index]
    assert transport.replies == []


def test_a_linux_guest_gets_osinfo_only() -> None:
    transport = Recorded([{"return": {"id": "debian", "kernel-release": "6.1.0-57-amd64"}}])
    files = dict(guestfiles.agent_files(GuestAgent(None, transport), "copy"))  # type: ignore[arg-type]
    assert list(files) == ["osinfo.copy"]
    assert len(transport.requests) == 1


def test_an_agent_refusing_osinfo_makes_no_file() -> None:
    transport = Recorded([{"error": {"class": "CommandNotFound", "desc": "not supported"}}])
    assert list(guestfiles.agent_files(GuestAgent(None, transport), "copy")) == []  # type: ignore[arg-type]


def test_tpm_state_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestfiles, "SWTPM_STATE_ROOT", tmp_path / "swtpm")
    state = tmp_path / "swtpm" / "uuid-a" / "tpm2"
    state.mkdir(parents=True)
    (state / "tpm2-00.permall").write_bytes(b"\x01\x02state")
    archive = guestfiles.tpm_archive("uuid-a")
    assert archive is not None
    (tmp_path / "tpm.tar").write_bytes(archive)
    dest = guestfiles.restore_tpm_state(tmp_path / "tpm.tar", "uuid-b")
    assert (dest / "tpm2" / "tpm2-00.permall").read_bytes() == b"\x01\x02state"
    with pytest.raises(FileExistsError):
        guestfiles.restore_tpm_state(tmp_path / "tpm.tar", "uuid-b")
    assert guestfiles.tpm_archive("uuid-none") is None


def test_a_tpm_archive_with_a_path_out_of_its_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guestfiles, "SWTPM_STATE_ROOT", tmp_path / "swtpm")
    (tmp_path / "evil").write_text("x")
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        tar.add(tmp_path / "evil", arcname="../../evil")
    with pytest.raises(ValueError, match="unexpected entry"):
        guestfiles.restore_tpm_state(tmp_path / "bad.tar", "uuid-c")
    assert not (tmp_path / "swtpm" / "uuid-c").exists()
    assert not (tmp_path / "swtpm" / "uuid-c.partial").exists()
