"""Two runs on one folder: the second is refused while the first holds it."""

from __future__ import annotations

from pathlib import Path

from .vmlab import LabVM, exists, images_identical, resume_to_end, run_tool, start_tool, stop_when


def test_a_second_restore_into_the_folder_is_refused(
    data_vm: LabVM, full_set: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "restored"
    image = dest / data_vm.images["vda"].name
    first = start_tool("virtnbdrestore", "-i", full_set, "-o", dest)
    try:
        stop_when(first, exists(Path(f"{image}.partial")))
        second = run_tool("virtnbdrestore", "-n", "-i", full_set, "-o", dest)
        assert Path(f"{image}.partial").exists(), "the second restore removed the first's work"
        assert not image.exists()
    finally:
        resume_to_end(first)
    assert second.returncode == 1, second.stderr
    errors = [line for line in second.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, second.stderr
    assert "in use by virtnbdrestore" in errors[0] and f"pid {first.pid}" in errors[0]
    assert images_identical(image, data_vm.images["vda"])


def test_a_second_backup_into_the_folder_is_refused(data_vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    first = start_tool("virtnbdbackup", "-d", data_vm.name, "-l", "full", "-o", out)
    try:
        stop_when(first, exists(out / "vda.full.data.partial"))
        refusals = [
            run_tool("virtnbdbackup", "-d", data_vm.name, "-l", level, "-n", "-o", out)
            for level in ("full", "inc", "auto")
        ]
    finally:
        resume_to_end(first)
    for proc in refusals:
        assert proc.returncode == 1, proc.stderr
        assert f"in use by virtnbdbackup -l full of domain {data_vm.name} (pid {first.pid}" in (
            proc.stderr
        )
        assert "Traceback" not in proc.stderr
    assert (out / "vda.full.data").is_file() and not list(out.glob("*.partial"))
    assert not list(out.glob(".virtnbdbackup.lock")), "the lock is released at the end"
    for cp in data_vm.dom.listAllCheckpoints(0):  # the shared VM as it was
        cp.delete(0)
