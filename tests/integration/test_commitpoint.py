"""Each backup run commits its files with a manifest, written last; a run
that fails leaves nothing a restore or the next run could take for a backup."""

from __future__ import annotations

import json
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirtnbdbackup.format.reader import file_adler32

from .vmlab import LabVM, backup_ok, run_tool, sh


def manifest(folder: Path, ident: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads((folder / f"manifest.{ident}.json").read_text())
    return doc


def test_full_and_inc_commit_a_manifest_of_their_files(small_vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "set"
    backup_ok(small_vm, out, "full")
    backup_ok(small_vm, out, "inc")
    full, inc = manifest(out, "virtnbdbackup.0"), manifest(out, "virtnbdbackup.1")
    assert not list(out.glob("*.pending")) and not list(out.glob("*.partial"))
    assert full["level"] == "full" and inc["level"] == "inc"
    chain = json.loads((out / f"{small_vm.name}.chain.json").read_text())["chain"]
    assert full["chain"] == inc["chain"] == chain
    files = full["files"]
    assert isinstance(files, dict)
    assert sorted(files) == [
        "vda.full.data",
        "vda.full.data.chksum",
        "vda.full.data.idx",
        "vda.virtnbdbackup.0.qcow.json",
        "vmconfig.virtnbdbackup.0.xml",
    ]
    for name, entry in files.items():
        path = out / name
        assert entry["size"] == path.stat().st_size, name
        assert entry["adler32"] == file_adler32(str(path)), name
    assert files["vda.full.data"]["adler32"] == int((out / "vda.full.data.chksum").read_text())
    inc_files = inc["files"]
    assert isinstance(inc_files, dict) and "vda.inc.virtnbdbackup.1.data" in inc_files


def test_a_zip_stream_carries_the_manifest(small_vm: LabVM, tmp_path: Path) -> None:
    with open(tmp_path / "set.zip", "wb") as fh:
        proc = run_tool(
            "virtnbdbackup", "-d", small_vm.name, "-l", "full", "-o", "-", "-n",
            cwd=tmp_path, stdout=fh,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(tmp_path / "set.zip") as archive:
        doc = json.loads(archive.read("manifest.virtnbdbackup.0.json"))
        data = archive.read("vda.full.data")
    assert doc["files"]["vda.full.data"]["size"] == len(data)
    # The chain identity stays beside the .cpt for the next incremental.
    chain = json.loads((tmp_path / f"{small_vm.name}.chain.json").read_text())["chain"]
    assert doc["chain"] == chain


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB file system: vda's full backup (7 MiB of data) fits, vdb's (12 MiB) does not."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs", mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_backup_that_fails_after_one_disk_leaves_no_backup(
    vm: LabVM, small_fs: Path, tmp_path: Path
) -> None:
    """Issue 12, item 5: the target fills up after vda's file is complete."""
    out = small_fs / "set"
    proc = run_tool(
        "virtnbdbackup", "-d", vm.name, "-l", "copy", "-o", out, "-n", "-w", "1", "-i", "vda,vdb"
    )
    assert proc.returncode == 1
    assert "No space left on device" in proc.stderr
    left = sorted(p.name for p in out.iterdir() if not p.name.endswith(".log"))
    assert left == [], left
    restore = run_tool("virtnbdrestore", "-i", out, "-o", tmp_path / "restored", "-n")
    assert restore.returncode == 1
    assert "Traceback" not in restore.stderr
