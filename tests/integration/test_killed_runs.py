"""A backup killed at any moment never wedges the chain: the next run
recognises what it left (a job, a checkpoint, unfinished or uncommitted
files), puts it right with a warning and completes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from .vmlab import (
    DiskSpec,
    LabVM,
    MiB,
    Mirror,
    backup_ok,
    create_vm,
    exists,
    images_identical,
    remove_vm,
    restore_image,
    resume_to_end,
    start_tool,
    stop_when,
)


@pytest.fixture()
def chain_vm(conn: libvirt.virConnect, tmp_path: Path) -> Iterator[tuple[LabVM, Path, Mirror]]:
    """A VM with a full backup in tmp_path/b, and 48 MiB changed since."""
    lab = create_vm(conn, [DiskSpec("vda", 256 * MiB, random_mib=32)], cdrom=False)
    mirror = Mirror.of(lab, "vda", tmp_path)
    out = tmp_path / "b"
    backup_ok(lab, out, "full")
    mirror.write("write -P 0x5e 64M 48M")
    yield lab, out, mirror
    remove_vm(lab)


def kill_inc_when(vm: LabVM, out: Path, ready: Path, min_size: int, level: str = "inc") -> None:
    proc = start_tool("virtnbdbackup", "-d", vm.name, "-l", level, "-o", out)
    stop_when(proc, exists(ready, min_size))
    proc.kill()
    proc.wait()


def assert_next_run_heals(
    vm: LabVM, out: Path, mirror: Mirror, tmp_path: Path, level: str
) -> str:
    """The next backup completes, saying what it put right; the set restores
    the VM's disk as it is now, and the chain goes on."""
    log = backup_ok(vm, out, level)
    assert "which was killed" in log
    assert not vm.has_job()
    restored = restore_image(out, tmp_path / "restored")
    assert images_identical(restored, mirror.path)
    mirror.write("write -P 0x6f 200M 1M")
    backup_ok(vm, out, "inc")
    assert not list(out.glob("*.partial"))
    again = restore_image(out, tmp_path / "again")
    assert images_identical(again, mirror.path)
    return log


def test_sigkill_mid_inc(chain_vm: tuple[LabVM, Path, Mirror], tmp_path: Path) -> None:
    vm, out, mirror = chain_vm
    kill_inc_when(vm, out, out / "vda.inc.virtnbdbackup.1.data.partial", 1 << 20)
    assert vm.has_job(), "a killed run cannot stop its job"
    scratch = Path(json.loads((out / ".virtnbdbackup.lock").read_text())["scratch"]).parent
    assert scratch.is_dir()
    log = assert_next_run_heals(vm, out, mirror, tmp_path, "inc")
    assert "stopped the backup job left running" in log
    assert "removed checkpoint virtnbdbackup.1" in log
    assert not scratch.exists(), "the killed run's scratch folder is removed"


def test_sigkill_right_after_the_data_file_is_renamed(
    chain_vm: tuple[LabVM, Path, Mirror], tmp_path: Path
) -> None:
    vm, out, mirror = chain_vm
    kill_inc_when(vm, out, out / "vda.inc.virtnbdbackup.1.data", 0)
    assert_next_run_heals(vm, out, mirror, tmp_path, "auto")


def test_sigterm_right_after_the_data_file_is_renamed(
    chain_vm: tuple[LabVM, Path, Mirror], tmp_path: Path
) -> None:
    vm, out, mirror = chain_vm
    proc = start_tool("virtnbdbackup", "-d", vm.name, "-l", "inc", "-o", out)
    stop_when(proc, exists(out / "vda.inc.virtnbdbackup.1.data"))
    proc.send_signal(signal.SIGTERM)
    err = resume_to_end(proc, expect=1)
    assert "caught SIGTERM: stopped" in err
    assert not vm.has_job() and vm.checkpoints() == ["virtnbdbackup.0"]
    backup_ok(vm, out, "auto")
    restored = restore_image(out, tmp_path / "restored")
    assert images_identical(restored, mirror.path)


def test_a_run_killed_after_its_commit_point_is_recorded(
    chain_vm: tuple[LabVM, Path, Mirror], tmp_path: Path
) -> None:
    """Killed between the manifest (the commit point) and the write of
    <domain>.cpt: the state is made as such a kill leaves it (the window is
    too short to hit with a signal), from a real run."""
    vm, out, mirror = chain_vm
    backup_ok(vm, out, "inc")
    at_inc1 = tmp_path / "at-inc1.qcow2"
    shutil.copyfile(mirror.path, at_inc1)
    assert (out / "manifest.virtnbdbackup.1.json").is_file()
    cpt = out / f"{vm.name}.cpt"
    cpt.write_text(json.dumps(["virtnbdbackup.0"]))  # the cpt write never happened
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".virtnbdbackup.lock").write_text(
        json.dumps(
            {
                "pid": dead.pid,
                "purpose": f"virtnbdbackup -l inc of domain {vm.name}",
                "domain": vm.name,
                "level": "inc",
                "checkpoint": "virtnbdbackup.1",
                "scratch": "/nonexistent/scratch",
            }
        )
    )

    mirror.write("write -P 0x7a 150M 2M")
    log = backup_ok(vm, out, "inc")
    assert "was committed, but the run was killed before it recorded the checkpoint" in log
    assert json.loads(cpt.read_text()) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
    restored = restore_image(out, tmp_path / "latest")
    assert images_identical(restored, mirror.path)
    until = restore_image(out, tmp_path / "until", "--until", "virtnbdbackup.1")
    assert images_identical(until, at_inc1)
