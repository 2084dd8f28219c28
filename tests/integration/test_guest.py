"""Backups of a real Linux guest writing to ext4, driven through its agent;
restores judged bit for bit (against copies taken while the guest was
frozen) and file by file (SHA-256 as the guest reported them)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .guestlab import Guest, debugfs_read, pattern, write_offline
from .vmlab import MiB, backup_ok, images_identical, run_tool


def restore_all(out: Path, dest: Path, *args: str) -> dict[str, Path]:
    proc = run_tool("virtnbdrestore", "-i", out, "-o", dest, "-n", *args)
    assert proc.returncode == 0, proc.stderr
    images = {p.name.split(".")[0].rsplit("-", 1)[-1]: p for p in dest.glob("*.qcow2")}
    assert sorted(images) == ["vda", "vdb"], sorted(p.name for p in dest.iterdir())
    return images


def check_restore(
    restored: dict[str, Path],
    copies: dict[str, Path],
    files: dict[str, str | None],
    scratch: Path,
) -> None:
    """Bit for bit against the frozen copies, then each file by its SHA-256
    (None: the file must be absent)."""
    for target in ("vda", "vdb"):
        assert images_identical(restored[target], copies[target]), target
    for target in ("vda", "vdb"):
        prefix = f"/mnt/{target}"
        wanted = {p[len(prefix) :]: h for p, h in files.items() if p.startswith(prefix + "/")}
        if wanted:
            assert debugfs_read(restored[target], sorted(wanted), scratch) == wanted, target


def test_files_between_full_inc_and_diff_appear_at_each_until_point(
    guest: Guest, tmp_path: Path
) -> None:
    out = tmp_path / "backup"
    files: dict[str, str | None] = {}
    points = []
    for step, level in enumerate(["full", "inc", "inc", "diff"]):
        for target in ("vda", "vdb"):
            path = f"/mnt/{target}/{level}{step}.bin"
            files[path] = guest.write_file(path, f"{level}{step}{target}", (step + 1) * 300_000)
        with guest.frozen():
            copies = guest.copy_images(tmp_path / f"at{step}")
            backup_ok(guest.vm, out, level)
        points.append((dict(files), copies))

    # The full, the two incs and the diff; --until names the checkpoint of
    # each inc (a diff makes none: the latest restore holds it).
    for step, until in enumerate(["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]):
        restored = restore_all(out, tmp_path / f"until{step}", "--until", until)
        at_files, copies = points[step]
        expected = {p: at_files.get(p) for p in files}
        check_restore(restored, copies, expected, tmp_path)
    at_files, copies = points[3]
    check_restore(restore_all(out, tmp_path / "latest"), copies, at_files, tmp_path)


def _data_size(out: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in out.glob(pattern))


def test_trimmed_files_make_a_small_inc_that_restores_the_right_files(
    guest: Guest, tmp_path: Path
) -> None:
    out = tmp_path / "backup"
    files = {
        f"/mnt/vdb/big{i}.bin": guest.write_file(f"/mnt/vdb/big{i}.bin", f"big{i}", 4 * MiB)
        for i in range(2)
    }
    files["/mnt/vdb/keep.bin"] = guest.write_file("/mnt/vdb/keep.bin", "keep", 100_000)
    backup_ok(guest.vm, out, "full")
    guest.run("rm /mnt/vdb/big0.bin /mnt/vdb/big1.bin && sync && fstrim /mnt/vdb")
    files["/mnt/vdb/big0.bin"] = files["/mnt/vdb/big1.bin"] = None
    with guest.frozen():
        copies = guest.copy_images(tmp_path / "trimmed")
        backup_ok(guest.vm, out, "inc")
    check_restore(restore_all(out, tmp_path / "restored"), copies, files, tmp_path)
    # The 8 MiB trimmed are not data: the inc holds the metadata changes only.
    assert _data_size(out, "vdb.inc.*.data") < 2 * MiB


def test_no_sparse_detection_saves_the_trimmed_ranges(guest: Guest, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    files = {"/mnt/vdb/gone.bin": guest.write_file("/mnt/vdb/gone.bin", "gone", 4 * MiB)}
    backup_ok(guest.vm, out, "full")
    guest.run("rm /mnt/vdb/gone.bin && sync && fstrim /mnt/vdb")
    files["/mnt/vdb/gone.bin"] = None
    with guest.frozen():
        copies = guest.copy_images(tmp_path / "trimmed")
        backup_ok(guest.vm, out, "inc", "--no-sparse-detection")
    assert _data_size(out, "vdb.inc.*.data") >= 4 * MiB
    check_restore(restore_all(out, tmp_path / "restored"), copies, files, tmp_path)


def test_files_added_while_shut_off_are_in_the_offline_inc(guest: Guest, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    files: dict[str, str | None] = {
        "/mnt/vda/online.bin": guest.write_file("/mnt/vda/online.bin", "online", 500_000)
    }
    backup_ok(guest.vm, out, "full")
    guest.shutdown()
    try:
        data = pattern("offline", 700_000)
        write_offline(guest.vm.images["vda"], "offline.bin", data, tmp_path)
        files["/mnt/vda/offline.bin"] = hashlib.sha256(data).hexdigest()
        backup_ok(guest.vm, out, "inc")
        assert len(list(out.glob("vda.inc.virtnbdbackup.0.*.data"))) == 1, sorted(
            p.name for p in out.iterdir()
        )
        # Shut off, the images are the consistent state.
        check_restore(restore_all(out, tmp_path / "restored"), guest.vm.images, files, tmp_path)
    finally:
        guest.start()  # for the tests after this one
    assert guest.sha256(["/mnt/vda/offline.bin"])["/mnt/vda/offline.bin"] == files[
        "/mnt/vda/offline.bin"
    ]
