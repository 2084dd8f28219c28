"""The backup job's socket and scratch files live in a fresh folder whose
name nobody can guess: a local user who creates 2.47's fixed names first
blocks nothing. --scratchdir keeps 2.47's names."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from .vmlab import BIN, LabVM, images_identical, restore_image

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def backup_with_names_taken(vm: LabVM, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A backup whose 2.47 socket and scratch names (they hold its PID) an
    unprivileged user created before it started: the shell creates them
    for its own PID, then becomes the backup with exec."""
    taken = f"/var/tmp/virtnbdbackup.$$ /var/tmp/backup.{vm.name}.vda.$$"
    backup = shlex.join([str(BIN / "virtnbdbackup"), "-d", vm.name, "-l", "full", "-n",
                         "-o", str(out), *args])  # fmt: skip
    script = f"{shlex.join(AS_NOBODY)} touch {taken} && echo $$ && exec {backup}"
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=600)


def test_names_taken_by_another_user_do_not_block_the_backup(
    small_vm: LabVM, tmp_path: Path
) -> None:
    vm = small_vm
    proc = backup_with_names_taken(vm, tmp_path / "backup")
    pid = proc.stdout.strip()
    try:
        assert proc.returncode == 0, proc.stderr
        line = next(x for x in proc.stderr.splitlines() if "fresh folder" in x)
        folder = line.split("scratch files and NBD socket in ", 1)[1].split(",", 1)[0]
        assert folder.startswith("/var/tmp/virtnbdbackup.") and not folder.endswith(pid)
        assert not os.path.exists(folder), "the scratch folder is removed after the job"
        vm.dom.suspend()
        assert images_identical(
            vm.images["vda"], restore_image(tmp_path / "backup", tmp_path / "r")
        )
        vm.dom.resume()
    finally:
        for name in (f"/var/tmp/virtnbdbackup.{pid}", f"/var/tmp/backup.{vm.name}.vda.{pid}"):
            Path(name).unlink(missing_ok=True)


def test_scratchdir_keeps_the_names_of_2_47(small_vm: LabVM, tmp_path: Path) -> None:
    scratch = small_vm.folder / "scratch"  # where QEMU's user can reach it
    scratch.mkdir()
    scratch.chmod(0o777)  # QEMU's user creates the socket in it
    proc = backup_with_names_taken(small_vm, tmp_path / "backup", "--scratchdir", str(scratch))
    assert proc.returncode == 0, proc.stderr
    pid = proc.stdout.strip()
    assert f"NBD server {scratch}/virtnbdbackup.{pid}" in proc.stderr
    for name in (f"/var/tmp/virtnbdbackup.{pid}", f"/var/tmp/backup.{small_vm.name}.vda.{pid}"):
        Path(name).unlink(missing_ok=True)
