"""Copy and full backups of a running VM, restored and compared bit for bit."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

from libvirtnbdbackup.format.reader import StreamReader, read_meta

from .vmlab import LabVM, images_identical, run_tool, sh


def backup(vm: LabVM, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("virtnbdbackup", "-d", vm.name, "-o", out, "-n", *args)


def restore(src: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("virtnbdrestore", "-i", src, "-o", out, "-n", *args)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


def test_full_backup_restores_bit_identical(fresh_vm: LabVM, tmp_path: Path) -> None:
    vm = fresh_vm
    out, restored = tmp_path / "backup", tmp_path / "restored"
    ok(backup(vm, out, "-l", "full", "--raw"))

    names = sorted(p.name for p in out.iterdir())
    assert "vda.full.data" in names and "vdb.full.data" in names
    assert "vdc.copy.data" in names  # raw-format disks are always copies
    assert "vda.full.data.chksum" in names and "vdc.copy.data.chksum" not in names
    assert "vmconfig.virtnbdbackup.0.xml" in names
    assert "vda.virtnbdbackup.0.qcow.json" in names
    assert not any(n.endswith(".partial") for n in names)
    assert any(n.startswith("backup.full.") and n.endswith(".log") for n in names)
    assert json.loads((out / f"{vm.name}.cpt").read_text()) == ["virtnbdbackup.0"]
    assert (out / "checkpoints" / "virtnbdbackup.0.xml").is_file()
    assert vm.checkpoints() == ["virtnbdbackup.0"]
    assert not vm.has_job()

    meta = read_meta(str(out / "vda.full.data"))
    assert (meta.checkpoint_name, meta.parent_checkpoint, meta.incremental) == (
        "virtnbdbackup.0",
        "",
        False,
    )
    assert meta.virtual_size == 3 * 1024**3 and meta.disk_format == "qcow2"

    ok(restore(out, restored, "--raw"))
    for target in ("vda", "vdb", "vdc"):
        image = restored / vm.images[target].name
        assert images_identical(vm.images[target], image), target
    assert (restored / "vmconfig.xml").is_file()
    info = json.loads(
        sh("qemu-img", "info", "--output", "json", restored / vm.images["vda"].name).stdout
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == 3 * 1024**3


def test_copy_backup_compressed_restores_bit_identical(vm: LabVM, tmp_path: Path) -> None:
    out, restored = tmp_path / "backup", tmp_path / "restored"
    before = vm.checkpoints()
    ok(backup(vm, out, "-l", "copy", "-z"))
    assert vm.checkpoints() == before, "copy backups create no checkpoint"
    assert not (out / f"{vm.name}.cpt").exists()
    assert (out / "vmconfig.copy.xml").is_file() and (out / "vda.copy.qcow.json").is_file()
    meta = read_meta(str(out / "vda.copy.data"))
    assert meta.compressed == 2
    assert not (out / "vdc.copy.data").exists(), "raw disks need --raw"

    ok(restore(out, restored))
    for target in ("vda", "vdb"):
        assert images_identical(vm.images[target], restored / vm.images[target].name)


def test_raw_output_equals_nbdcopy_reference(vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    ok(backup(vm, out, "-l", "copy", "-t", "raw", "-i", "vda"))
    reference = tmp_path / "reference.raw"
    # The VM holds the image lock; qemu-nbd reads it with locking off.
    opts = f"driver=qcow2,file.driver=file,file.filename={vm.images['vda']},file.locking=off"
    sh("nbdcopy", "--", "[", "qemu-nbd", "-r", "--image-opts", opts, "]", reference)
    produced = out / "vda.copy.data"
    assert produced.stat().st_size == reference.stat().st_size == 3 * 1024**3
    assert images_identical(produced, reference)
    assert not (out / "vda.copy.data.chksum").exists()
    # Sparse: the image occupies about its data, not its virtual size.
    assert produced.stat().st_blocks * 512 < 64 * 1024**2


def test_stream_is_thin(vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    ok(backup(vm, out, "-l", "copy", "-i", "vda"))
    data_file = out / "vda.copy.data"
    with open(data_file, "rb") as fh:
        reader = StreamReader(fh, str(data_file))
        frames = list(reader.frames())
    data = sum(f.length for f in frames if f.kind.value == b"data")
    # 1M + 512K (the zeroed half stays allocated or not) + 4M + 1M + 64K written.
    assert data + 512 * 1024 >= 7 * 1024**2 and data <= 8 * 1024**2
    overhead = data_file.stat().st_size - data
    assert 0 < overhead < 16 * 1024, overhead
    # Frames cover the disk without gaps, in order, data and zero alternating.
    pos = 0
    for prev, frame in zip([None, *frames], frames, strict=False):
        assert frame.start == pos
        pos += frame.length
        assert prev is None or prev.kind != frame.kind
    assert pos == 3 * 1024**3


def test_disk_selection_rules(vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "exclude"
    proc = ok(backup(vm, out, "-l", "copy", "-x", "vda"))
    assert sorted(p.name for p in out.glob("*.data")) == ["vdb.copy.data"]
    log = proc.stderr
    assert "skipping disk vda: excluded by --exclude" in log
    assert "skipping disk vdc: raw images are only backed up with --raw" in log
    assert "skipping disk sda: cdrom drives are not backed up" in log

    out = tmp_path / "include"
    ok(backup(vm, out, "-l", "copy", "-i", "vdc", "--raw"))
    assert sorted(p.name for p in out.glob("*.data")) == ["vdc.copy.data"]
    assert sh("cmp", out / "vdc.copy.data", vm.images["vdc"]).returncode == 0

    proc = backup(vm, tmp_path / "unknown", "-l", "copy", "-i", "vdz")
    assert proc.returncode == 1
    assert "no disk named vdz" in proc.stderr


def test_verify_catches_a_flipped_byte(vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    ok(backup(vm, out, "-l", "copy", "-i", "vdb"))
    ok(run_tool("virtnbdrestore", "-i", out, "-o", "verify"))

    data_file = out / "vdb.copy.data"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(raw)
    proc = run_tool("virtnbdrestore", "-i", out, "-o", "verify")
    assert proc.returncode == 1
    assert "vdb.copy.data" in proc.stderr and "does not match" in proc.stderr


def test_truncated_stream_fails_restore_without_leaving_an_image(vm: LabVM, tmp_path: Path) -> None:
    out, restored = tmp_path / "backup", tmp_path / "restored"
    ok(backup(vm, out, "-l", "copy", "-i", "vdb"))
    data_file = out / "vdb.copy.data"
    size = data_file.stat().st_size
    with open(data_file, "r+b") as fh:
        fh.truncate(size - 5000)
    proc = restore(out, restored)
    assert proc.returncode == 1  # the manifest's size tells it first
    assert "vdb.copy.data has" in proc.stderr and "truncated" in proc.stderr
    for manifest in out.glob("manifest.*"):  # as 2.47 leaves a set: the reader tells it
        manifest.unlink()
    proc = restore(out, restored)
    assert proc.returncode == 1
    assert "vdb.copy.data at offset" in proc.stderr and "truncated" in proc.stderr
    assert list(restored.iterdir()) == [], "no image may be left behind"


def test_wrong_data_size_fails_restore(vm: LabVM, tmp_path: Path) -> None:
    out, restored = tmp_path / "backup", tmp_path / "restored"
    ok(backup(vm, out, "-l", "copy", "-i", "vdb"))
    data_file = out / "vdb.copy.data"
    raw = data_file.read_bytes()
    meta = read_meta(str(data_file))
    wrong = str(meta.data_size + 4096).encode()
    assert len(wrong) == len(str(meta.data_size))
    data_file.write_bytes(
        raw.replace(b'"dataSize": %d' % meta.data_size, b'"dataSize": ' + wrong, 1)
    )
    proc = restore(out, restored)
    assert proc.returncode == 1
    assert "dataSize" in proc.stderr and "vdb.copy.data" in proc.stderr
    assert list(restored.iterdir()) == []


def test_zip_to_stdout_unzips_to_a_restorable_set(fresh_vm: LabVM, tmp_path: Path) -> None:
    vm = fresh_vm
    work, unpacked, restored = tmp_path / "cwd", tmp_path / "unpacked", tmp_path / "restored"
    work.mkdir()
    archive = tmp_path / "backup.zip"
    with open(archive, "wb") as fh:
        proc = run_tool(
            "virtnbdbackup", "-d", vm.name, "-l", "full", "-o", "-", "-n", cwd=work, stdout=fh
        )
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        assert {
            "vda.full.data",
            "vdb.full.data",
            "vda.full.data.chksum",
            "vmconfig.virtnbdbackup.0.xml",
            f"{vm.name}.cpt",
        } <= names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        zf.extractall(unpacked)
    # The checkpoint files stay in the current folder for the next incremental.
    assert json.loads((work / f"{vm.name}.cpt").read_text()) == ["virtnbdbackup.0"]
    assert (work / "checkpoints" / "virtnbdbackup.0.xml").is_file()

    ok(run_tool("virtnbdrestore", "-i", unpacked, "-o", "verify"))
    ok(restore(unpacked, restored))
    for target in ("vda", "vdb"):
        assert images_identical(vm.images[target], restored / vm.images[target].name)


def test_full_backup_replaces_own_checkpoints_only(fresh_vm: LabVM, tmp_path: Path) -> None:
    vm = fresh_vm
    for name in ("virtnbdbackup.0", "virtnbdbackup.1", "foreign-tool.0"):
        sh(
            "virsh",
            "checkpoint-create-as",
            vm.name,
            name,
            "--diskspec",
            "vda,checkpoint=bitmap",
            "--diskspec",
            "vdb,checkpoint=no",
            "--diskspec",
            "vdc,checkpoint=no",
        )
    ok(backup(vm, tmp_path / "first", "-l", "full", "-i", "vda"))
    assert vm.checkpoints() == ["foreign-tool.0", "virtnbdbackup.0"]
    ok(backup(vm, tmp_path / "second", "-l", "full", "-i", "vda"))
    assert vm.checkpoints() == ["foreign-tool.0", "virtnbdbackup.0"]


def test_refuses_a_folder_holding_a_backup(vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    ok(backup(vm, out, "-l", "copy", "-i", "vdb"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = backup(vm, out, "-l", "copy", "-i", "vdb")
    assert proc.returncode == 1
    assert "already holds a backup set" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_restore_never_overwrites_an_image(vm: LabVM, tmp_path: Path) -> None:
    out, restored = tmp_path / "backup", tmp_path / "restored"
    ok(backup(vm, out, "-l", "copy", "-i", "vdb"))
    restored.mkdir()
    existing = restored / vm.images["vdb"].name
    existing.write_bytes(b"precious")
    proc = restore(out, restored)
    assert proc.returncode == 1 and "exists already" in proc.stderr
    assert existing.read_bytes() == b"precious"


def test_dump_prints_meta_of_each_file(vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    ok(backup(vm, out, "-l", "copy", "-x", "vda", "--raw"))
    proc = ok(run_tool("virtnbdrestore", "-i", out, "-o", "dump"))
    dumped = json.loads(proc.stdout)
    assert [d["diskName"] for d in dumped] == ["vdb"]  # 2.x leaves the raw vdc out
    assert dumped[0]["virtualSize"] == 1024**3 and "file" not in dumped[0]
    proc = ok(run_tool("virtnbdrestore", "-i", out, "-o", "dump", "--dump-detail"))
    detail = json.loads(proc.stdout)
    assert sorted(d["file"] for d in detail) == ["vdb.copy.data", "vdc.copy.data"]


def test_strict_turns_warnings_into_exit_2(vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    ok(backup(vm, out, "-l", "copy", "-i", "vdb"))
    (out / "vdb.copy.qcow.json").unlink()  # restore warns and uses defaults
    proc = restore(out, tmp_path / "lenient")
    assert proc.returncode == 0 and "WARNING" in proc.stderr
    proc = restore(out, tmp_path / "strict", "--strict")
    assert proc.returncode == 2
    assert images_identical(vm.images["vdb"], tmp_path / "strict" / vm.images["vdb"].name)
