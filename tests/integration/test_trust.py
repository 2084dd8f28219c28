"""Issue 12, items 1-6: restore, verify and map trust nothing they have not checked.

One VM with two disks is backed up once per module: chain A (full + inc,
uncompressed), and chain B (a full and an inc of its own) for the foreign
file. Each test damages a copy of a set and runs the real commands.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from libvirtnbdbackup.format.chainimage import ChainImage

from .vmlab import (
    DiskSpec,
    LabVM,
    MiB,
    backup_ok,
    create_vm,
    hmp_io,
    images_identical,
    remove_vm,
    run_tool,
    sh,
)


@dataclass
class Sets:
    vm: LabVM
    a: Path  # chain A: full, inc
    b: Path  # chain B: full, inc (other data)
    reference: Path  # the restore of A, clean


@pytest.fixture(scope="module")
def sets(conn: libvirt.virConnect, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sets]:
    vm = create_vm(
        conn,
        [
            DiskSpec("vda", 256 * MiB, writes=["write -P 0xab 0 4M", "write -P 0xac 100M 1M"]),
            DiskSpec("vdb", 128 * MiB, writes=["write -P 0x42 0 2M"]),
        ],
        cdrom=False,
    )
    root = tmp_path_factory.mktemp("trust")
    a, b = root / "a", root / "b"
    backup_ok(vm, a, "full")
    hmp_io(vm, "vda", "write -P 0x11 2M 1M")  # over data of the full
    backup_ok(vm, a, "inc")
    reference = root / "reference"
    ok(restore(a, reference))
    backup_ok(vm, b, "full")
    hmp_io(vm, "vda", "write -P 0x22 2M 1M")  # what B's inc holds and A's does not
    backup_ok(vm, b, "inc")
    yield Sets(vm, a, b, reference)
    remove_vm(vm)


def restore(src: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("virtnbdrestore", "-i", src, "-o", out, "-n", *args)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


def fails(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1 with one clear error line (no traceback) holding ``words``."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert errors, proc.stderr
    for word in words:
        assert word in errors[-1], errors[-1]
    return errors[-1]


def copy_of(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*") if p.name.endswith((".qcow2", ".partial")))


def without_manifests(folder: Path) -> Path:
    """The set as virtnbdbackup 2.47 leaves it: no manifests, no chain file."""
    for path in [*folder.glob("manifest.*"), *folder.glob("*.chain.json")]:
        path.unlink()
    return folder


def damage_header(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how.startswith("truncate"):
        path.write_bytes(raw[: int(how.split("-")[1])])
    elif how == "flip":
        path.write_bytes(raw[:20] + bytes([raw[20] ^ 0x01]) + raw[21:])
    elif how == "kind":
        path.write_bytes(b"data" + raw[4:])


# --- 1: a file whose name says stream is a stream --------------------------------------


@pytest.mark.parametrize("manifests", [True, False], ids=["ours", "as-2.47"])
@pytest.mark.parametrize("how", ["truncate-0", "truncate-39", "flip", "kind"])
def test_a_damaged_first_header_is_an_error_naming_the_file(
    sets: Sets, tmp_path: Path, how: str, manifests: bool
) -> None:
    folder = copy_of(sets.a, tmp_path / "set")
    if not manifests:
        without_manifests(folder)
    damage_header(folder / "vda.full.data", how)
    line = fails(restore(folder, tmp_path / "r"), "vda.full.data")
    if not manifests or how in ("flip", "kind"):
        assert "at offset 0" in line, line  # the reader's own check, not the manifest's
    assert images(tmp_path / "r") == [] if (tmp_path / "r").exists() else True
    fails(restore(folder, tmp_path / "raw", "--raw"), "vda.full.data")
    assert not list((tmp_path / "raw").glob("*")) if (tmp_path / "raw").exists() else True
    fails(run_tool("virtnbdrestore", "-i", folder, "-o", "verify"), "vda.full.data")


# --- 2: every byte applied is checked against the checksum -----------------------------


@pytest.mark.parametrize("manifests", [True, False], ids=["ours", "as-2.47"])
def test_a_flipped_payload_byte_fails_the_restore_before_the_image_exists(
    sets: Sets, tmp_path: Path, manifests: bool
) -> None:
    folder = copy_of(sets.a, tmp_path / "set")
    if not manifests:
        without_manifests(folder)
    data = folder / "vda.full.data"
    raw = bytearray(data.read_bytes())
    at = raw.index(b"\xab" * 64)  # inside the first data extent
    raw[at] ^= 0xFF
    data.write_bytes(raw)
    out = tmp_path / "r"
    fails(restore(folder, out), "vda.full.data", "checksum", "damaged")
    assert [p.name for p in out.glob("*.qcow2*") if "vda" in p.name] == []


def test_a_flipped_byte_in_data_a_later_file_overwrites_is_found_too(
    sets: Sets, tmp_path: Path
) -> None:
    """The restore never applies those bytes, but the file's checksum covers them."""
    folder = copy_of(sets.a, tmp_path / "set")
    data = folder / "vda.full.data"
    raw = bytearray(data.read_bytes())
    at = _payload_offset(folder, "vda.full.data", 2 * MiB + 4096)  # the inc overwrites it
    raw[at] ^= 0xFF
    data.write_bytes(raw)
    fails(restore(folder, tmp_path / "r"), "vda.full.data", "checksum")


def _payload_offset(folder: Path, name: str, disk_offset: int) -> int:
    """File offset of the byte at ``disk_offset`` of the disk, from the index."""
    doc = json.loads((folder / f"{name}.idx").read_text())
    for item in doc["extents"]:
        if len(item) >= 3 and item[0] <= disk_offset < item[0] + item[1]:
            return int(item[2]) + disk_offset - int(item[0])
    raise AssertionError(f"{disk_offset} is in no data extent of {name}")


# --- 3: the index is bound to its data file ---------------------------------------------


def test_an_edited_index_offset_is_rejected_and_rebuilt(sets: Sets, tmp_path: Path) -> None:
    folder = copy_of(sets.a, tmp_path / "set")
    index = folder / "vda.full.data.idx"
    doc = json.loads(index.read_text())
    data = [e for e in doc["extents"] if len(e) >= 3]
    data[0][2] += 4096  # points 4 KiB into the extent's own payload
    index.write_text(json.dumps(doc, separators=(",", ":")))
    proc = ok(restore(folder, tmp_path / "r"))
    assert "vda.full.data.idx" in proc.stderr and "rebuilding" in proc.stderr
    for name in ("vda", "vdb"):
        image = next((tmp_path / "r").glob(f"*{name}.qcow2"))
        assert images_identical(next(sets.reference.glob(f"*{name}.qcow2")), image), name

    # The map (the nbdkit plugin's reader) serves the true disk too.
    index.write_text(json.dumps(doc, separators=(",", ":")))
    reference_raw = tmp_path / "vda.raw"
    sh("qemu-img", "convert", "-O", "raw", next(sets.reference.glob("*vda.qcow2")), reference_raw)
    chain = [str(folder / "vda.full.data"), str(folder / "vda.inc.virtnbdbackup.1.data")]
    image = ChainImage(chain)
    try:
        with open(reference_raw, "rb") as fh:
            for offset in range(0, image.size, 4 * MiB):
                want = fh.read(4 * MiB)
                got = memoryview(bytearray(len(want)))
                image.read_into(got, offset)
                assert bytes(got) == want, offset
    finally:
        image.close()


# --- 4: a file of another chain is refused ----------------------------------------------


@pytest.mark.parametrize("with_manifest", [False, True], ids=["alone", "with-its-manifest"])
def test_an_inc_of_another_chain_is_refused(
    sets: Sets, tmp_path: Path, with_manifest: bool
) -> None:
    folder = tmp_path / "set"
    shutil.copytree(sets.a, folder, ignore=shutil.ignore_patterns("*inc*", "*.1.*", "*.1.json"))
    names = ["vda.inc.virtnbdbackup.1.data", "vda.inc.virtnbdbackup.1.data.chksum"]
    if with_manifest:
        names.append("manifest.virtnbdbackup.1.json")
    for name in names:
        shutil.copy(sets.b / name, folder / name)
    if with_manifest:  # B's inc of vdb is not brought along: take it out of B's manifest
        manifest = json.loads((folder / names[-1]).read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if k.startswith("vda")}
        (folder / names[-1]).write_text(json.dumps(manifest))
    line = fails(restore(folder, tmp_path / "r"), "vda.inc.virtnbdbackup.1.data")
    assert ("another chain" in line) if with_manifest else ("no manifest" in line), line
    assert not (tmp_path / "r").exists() or images(tmp_path / "r") == []


# --- 5: a set missing a disk its backup wrote --------------------------------------------


def test_a_set_missing_a_disk_its_backup_wrote_is_an_error(sets: Sets, tmp_path: Path) -> None:
    folder = copy_of(sets.a, tmp_path / "set")
    (folder / "vdb.inc.virtnbdbackup.1.data").unlink()
    fails(restore(folder, tmp_path / "r"), "virtnbdbackup.1", "vdb.inc.virtnbdbackup.1.data")
    fails(run_tool("virtnbdrestore", "-i", folder, "-o", "verify"), "vdb.inc.virtnbdbackup.1.data")


def test_a_set_of_2_47_restores_with_a_warning(sets: Sets, tmp_path: Path) -> None:
    folder = without_manifests(copy_of(sets.a, tmp_path / "set"))
    proc = ok(restore(folder, tmp_path / "r"))
    assert "has no manifest" in proc.stderr and "checked against their .chksum" in proc.stderr
    image = next((tmp_path / "r").glob("*vda.qcow2"))
    assert images_identical(next(sets.reference.glob("*vda.qcow2")), image)


def test_an_inc_that_2_47_added_to_our_set_restores_with_a_warning(
    sets: Sets, tmp_path: Path
) -> None:
    """Sets move both ways: 2.47 continues our chain without writing a manifest."""
    folder = copy_of(sets.a, tmp_path / "set")
    (folder / "manifest.virtnbdbackup.1.json").unlink()  # as 2.47 leaves its inc
    proc = ok(restore(folder, tmp_path / "r"))
    assert "an incremental backup of virtnbdbackup 2.x" in proc.stderr, proc.stderr
    image = next((tmp_path / "r").glob("*vda.qcow2"))
    assert images_identical(next(sets.reference.glob("*vda.qcow2")), image)
    ok(run_tool("virtnbdrestore", "-i", folder, "-o", "verify"))
    # without the checkpoint 2.47 records, the file continues nothing: refused
    (folder / "checkpoints" / "virtnbdbackup.1.xml").unlink()
    fails(restore(folder, tmp_path / "r2"), "listed in no manifest")


def test_our_next_inc_adopts_the_inc_2_47_added(small_vm: LabVM, tmp_path: Path) -> None:
    folder = tmp_path / "set"
    backup_ok(small_vm, folder, "full")
    hmp_io(small_vm, "vda", "write -P 0x31 1M 1M")
    backup_ok(small_vm, folder, "inc")
    (folder / "manifest.virtnbdbackup.1.json").unlink()  # as 2.47 leaves its inc
    hmp_io(small_vm, "vda", "write -P 0x32 2M 1M")
    backup_ok(small_vm, folder, "inc")
    manifest = json.loads((folder / "manifest.virtnbdbackup.2.json").read_text())
    assert "vda.inc.virtnbdbackup.1.data" in manifest["files"], manifest
    proc = ok(restore(folder, tmp_path / "r"))
    assert "listed in no manifest" not in proc.stderr, proc.stderr


def test_an_interrupted_inc_is_skipped_by_restore_and_taken_back(
    sets: Sets, tmp_path: Path
) -> None:
    """What a killed inc left (its journal names it) is not part of the set."""
    folder = copy_of(sets.a, tmp_path / "set")
    for name in list(folder.glob("*virtnbdbackup.1*")):
        if name.name.startswith("manifest."):
            name.unlink()
    (folder / "manifest.virtnbdbackup.1.pending").write_text(
        json.dumps(
            {
                "format": "virtnbdbackup-manifest",
                "pending": "virtnbdbackup.1",
                "files": [
                    p.name for p in folder.glob("*virtnbdbackup.1*") if "manifest" not in p.name
                ],
            }
        )
    )
    proc = ok(restore(folder, tmp_path / "r"))
    assert "never completed" in proc.stderr
    image = next((tmp_path / "r").glob("*vda.qcow2"))
    full_only = tmp_path / "full-only"
    shutil.copytree(sets.a, full_only, ignore=shutil.ignore_patterns("*virtnbdbackup.1*"))
    ok(restore(full_only, tmp_path / "r0"))
    assert images_identical(next((tmp_path / "r0").glob("*vda.qcow2")), image)


# --- 6: a damaged domain XML is one line -------------------------------------------------


@pytest.mark.parametrize("how", ["malformed", "unreadable", "not-a-domain"])
def test_a_damaged_vmconfig_is_one_clear_line(sets: Sets, tmp_path: Path, how: str) -> None:
    folder = copy_of(sets.a, tmp_path / "set")
    config = folder / "vmconfig.virtnbdbackup.1.xml"
    config.unlink()
    if how == "malformed":
        config.write_text("<domain><name>x</name><devices>")
    elif how == "unreadable":
        config.mkdir()
    else:
        config.write_text("<network/>")
    fails(restore(folder, tmp_path / "r"), "vmconfig.virtnbdbackup.1.xml")
