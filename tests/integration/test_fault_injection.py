"""Faults at seeded random points of backups and restores: SIGKILL at a
random byte count of the file being written, ENOSPC at a random offset
(a file system filled up to a random amount of free space). After each,
the next run completes, or fails with one line saying what to do and
completes once that is done; and every kept point still restores bit for
bit. VNBT_FAULT_SEED picks another set of points."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from .vmlab import (
    DiskSpec,
    LabVM,
    MiB,
    Mirror,
    create_vm,
    images_identical,
    remove_vm,
    restore_image,
    run_tool,
    small_filesystem,
    start_tool,
    stop_when,
)

SEED = int(os.environ.get("VNBT_FAULT_SEED", "20261201"))
DISK = 256 * MiB


@dataclass
class Lab:
    vm: LabVM
    mirror: Mirror
    out: Path  # the backup folder, on a file system the test can fill
    fs: Path
    work: Path
    rng: random.Random
    kept: dict[str, Path] = field(default_factory=dict)  # checkpoint -> expected image
    log: list[str] = field(default_factory=list)  # each case and its result

    def change(self) -> None:
        """Random writes of 8 to 40 MiB in all, as a guest would make them."""
        for _ in range(self.rng.randint(1, 4)):
            length = self.rng.randint(2, 10) * MiB
            offset = self.rng.randrange(0, DISK - length, 64 * 1024)
            self.mirror.write(f"write -P {self.rng.randint(1, 255)} {offset} {length}")

    def chain(self) -> list[str]:
        cpt = self.out / f"{self.vm.name}.cpt"
        return list(json.loads(cpt.read_text())) if cpt.is_file() else []

    def keep(self) -> None:
        """The newest checkpoint of the chain is a kept point: the mirror now."""
        name = self.chain()[-1]
        self.kept[name] = self.work / f"expected.{name}.qcow2"
        shutil.copyfile(self.mirror.path, self.kept[name])

    def backup(self, level: str = "auto") -> subprocess.CompletedProcess[str]:
        return run_tool("virtnbdbackup", "-d", self.vm.name, "-l", level, "-n", "-o", self.out)

    def backup_ok(self, case: str) -> None:
        proc = self.backup()
        assert proc.returncode == 0, f"{case}: the next run failed: {proc.stderr}"
        self.keep()
        healed = [line for line in proc.stderr.splitlines() if "WARNING" in line]
        self.log.append(f"{case}: next run completed ({len(healed)} warning(s))")
        assert not self.vm.has_job()

    def fill(self, free: int) -> Path:
        """Leave ``free`` bytes free on the backup file system."""
        st = os.statvfs(self.fs)
        filler = self.fs / "filler"
        size = max(0, st.f_bavail * st.f_frsize - free)
        subprocess.run(["fallocate", "-l", str(size), str(filler)], check=True)
        return filler


@pytest.fixture()
def lab(conn: libvirt.virConnect, tmp_path: Path) -> Iterator[Lab]:
    vm = create_vm(conn, [DiskSpec("vda", DISK, random_mib=32)], cdrom=False)
    try:
        mirror = Mirror.of(vm, "vda", tmp_path)
        with small_filesystem(tmp_path / "fs", 512) as fs:
            yield Lab(vm, mirror, fs / "backup", fs, tmp_path, random.Random(SEED))
    finally:
        remove_vm(vm)


def sigkill_at(proc: subprocess.Popen[str], partial: Path, count: int) -> bool:
    """SIGKILL ``proc`` once ``partial`` holds ``count`` bytes; False when it
    finished (or renamed the file) first."""
    try:
        stop_when(proc, lambda: partial.exists() and partial.stat().st_size >= count)
    except AssertionError:
        return False
    except FileNotFoundError:  # renamed between the two looks
        pass
    proc.kill()
    proc.wait()
    return True


def assert_every_kept_point_restores(lab: Lab) -> None:
    for name, expected in lab.kept.items():
        dest = lab.work / f"restore.{name}"
        restored = restore_image(lab.out, dest, "--until", name)
        assert images_identical(restored, expected), f"kept point {name} does not restore"
        shutil.rmtree(dest)


def test_faults_at_random_points(lab: Lab) -> None:
    rng = lab.rng
    lab.backup_ok("first full")

    # SIGKILL at random byte counts of the data file an inc writes.
    for number in range(3):
        lab.change()
        partial = lab.out / f"vda.inc.virtnbdbackup.{len(lab.chain())}.data.partial"
        count = rng.randrange(0, 8 * MiB)
        proc = start_tool("virtnbdbackup", "-d", lab.vm.name, "-l", "inc", "-o", lab.out)
        case = f"inc SIGKILL #{number} at byte {count}"
        if not sigkill_at(proc, partial, count):
            assert proc.returncode == 0, proc.communicate()
            lab.keep()
            lab.log.append(f"{case}: finished before the kill")
            continue
        lab.backup_ok(case)

    # ENOSPC at a random offset of an inc: one line, then free space and go on.
    for number in range(2):
        lab.change()
        free = rng.randrange(64 * 1024, 6 * MiB)
        filler = lab.fill(free)
        proc = lab.backup("inc")
        case = f"inc ENOSPC #{number} with {free} bytes free"
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert proc.returncode == 1 and len(errors) == 1, f"{case}: {proc.stderr}"
        assert "No space left on device" in errors[0] and "Traceback" not in proc.stderr
        assert not list(lab.out.glob("*.partial")) and not lab.vm.has_job()
        assert lab.vm.checkpoints() == lab.chain(), "the failed inc's checkpoint is taken back"
        lab.log.append(f"{case}: one line: {errors[0].split(': ', 1)[1][:80]}")
        filler.unlink()
        lab.backup_ok(case)

    assert_every_kept_point_restores(lab)

    # Restores: SIGKILL at random byte counts of the image, ENOSPC at a
    # random offset; the next restore into the folder completes.
    latest, expected = list(lab.kept.items())[-1]
    for number in range(2):
        dest = lab.work / f"killed-restore-{number}"
        count = rng.randrange(0, 24 * MiB)
        proc = start_tool("virtnbdrestore", "-i", lab.out, "-o", dest)
        image = dest / lab.vm.images["vda"].name
        case = f"restore SIGKILL #{number} at byte {count}"
        if sigkill_at(proc, Path(f"{image}.partial"), count):
            restored = restore_image(lab.out, dest)
            lab.log.append(f"{case}: next restore completed")
        else:
            lab.log.append(f"{case}: finished before the kill")
            restored = image
        assert images_identical(restored, expected), case
    for number in range(2):
        size = rng.randint(2, 24)
        with small_filesystem(lab.work / f"tiny-{number}", size) as tiny:
            proc = run_tool("virtnbdrestore", "-n", "-i", lab.out, "-o", tiny / "r")
            case = f"restore ENOSPC #{number} into {size} MiB"
            errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
            assert proc.returncode == 1 and len(errors) == 1, f"{case}: {proc.stderr}"
            assert "Traceback" not in proc.stderr
            assert f"cannot write {tiny / 'r'}/" in errors[0] and "No space left" in errors[0]
            assert not list((tiny / "r").glob("*.partial")), case
            lab.log.append(f"{case}: one line: {errors[0].split(': ', 1)[1][:80]}")
    restored = restore_image(lab.out, lab.work / "final")
    assert images_identical(restored, expected), f"latest ({latest}) after the faults"
    print("\n".join([f"fault cases (seed {SEED}):", *lab.log]))
