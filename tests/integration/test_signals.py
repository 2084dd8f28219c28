"""SIGINT and SIGTERM at any moment: one line, exit 1, nothing left behind;
a second signal exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from .vmlab import LabVM, exists, resume_to_end, run_tool, start_tool, stop_when

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def status_mask(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def wait_for_handlers(proc: subprocess.Popen[str]) -> None:
    """Until the command catches SIGTERM: from then on its own code runs
    (Python catches SIGINT by itself, never SIGTERM)."""
    while not status_mask(proc.pid, "SigCgt") & SIGTERM_BIT:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.001)


def opens(proc: subprocess.Popen[str], path: Path) -> bool:
    fds = Path(f"/proc/{proc.pid}/fd")
    try:
        return any(os.readlink(fd) == str(path) for fd in fds.iterdir())
    except OSError:
        return False


def error_lines(stderr: str) -> list[str]:
    """ERROR lines, and the line of a command stopped before its logging started."""
    return [
        line
        for line in stderr.splitlines()
        if " ERROR " in line or (line.startswith("virtnbd") and ": caught " in line)
    ]


def assert_one_line_stop(proc: subprocess.Popen[str], stderr: str, name: str) -> None:
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert f"caught {name}: stopped" in errors[0]


def assert_vm_untouched(vm: LabVM) -> None:
    assert vm.state() == libvirt.VIR_DOMAIN_RUNNING
    assert not vm.has_job()
    assert vm.checkpoints() == []
    for pattern in (f"backup.{vm.name}.*", f"virtnbdbackup.*/backup.{vm.name}.*"):
        assert not list(Path("/var/tmp").glob(pattern)), "scratch files left behind"


def command(kind: str, vm: LabVM, full_set: Path, tmp_path: Path) -> list[str | Path]:
    if kind == "backup":
        return ["virtnbdbackup", "-d", vm.name, "-l", "full", "-o", tmp_path / "b"]
    if kind == "restore":
        return ["virtnbdrestore", "-i", full_set, "-o", tmp_path / "r"]
    return ["virtnbdrestore", "-i", full_set, "-o", "verify"]


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.06])
@pytest.mark.parametrize("kind", ["backup", "restore", "verify"])
def test_sigint_early_stops_with_one_line(
    kind: str, delay: float, data_vm: LabVM, full_set: Path, tmp_path: Path
) -> None:
    """From the first moment the command runs: while it imports, connects,
    plans, starts the job."""
    tool, *args = command(kind, data_vm, full_set, tmp_path)
    proc = start_tool(str(tool), *args)
    wait_for_handlers(proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert_one_line_stop(proc, err, "SIGINT")
    assert_vm_untouched(data_vm)
    if kind == "backup":
        assert not list((tmp_path / "b").glob("*.data*"))
    if kind == "restore":
        assert not list((tmp_path / "r").glob("*.qcow2*"))


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_verify_stops_mid_file(name: str, full_set: Path) -> None:
    data = full_set / "vda.copy.data"
    proc = start_tool("virtnbdrestore", "-i", full_set, "-o", "verify")
    stop_when(proc, lambda: opens(proc, data))
    proc.send_signal(signal.Signals[name])
    err = resume_to_end(proc, expect=1)
    assert_one_line_stop(proc, err, name)
    assert "OK" not in err


def test_restore_stops_mid_image_and_removes_it(full_set: Path, tmp_path: Path) -> None:
    dest = tmp_path / "r"
    proc = start_tool("virtnbdrestore", "-i", full_set, "-o", dest)
    stop_when(proc, lambda: any(exists(p, 8 << 20)() for p in dest.glob("*.partial")))
    proc.send_signal(signal.SIGTERM)
    err = resume_to_end(proc, expect=1)
    assert_one_line_stop(proc, err, "SIGTERM")
    assert not list(dest.glob("*.qcow2*")) and not list(dest.glob(".virtnbdbackup.lock"))


def test_a_second_sigint_exits_at_once(data_vm: LabVM, tmp_path: Path) -> None:
    out = tmp_path / "b"
    proc = start_tool("virtnbdbackup", "-d", data_vm.name, "-l", "full", "-z", "16", "-o", out)
    try:
        while not exists(out / "vda.full.data.partial", 1 << 20)():
            assert proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # until it says it took the first
            lines.append(line)
            if "caught SIGINT: cleaning up" in line:
                break
        proc.send_signal(signal.SIGINT)  # while it cleans up
        _out, rest = proc.communicate(timeout=60)
        err = "".join(lines) + rest
        assert proc.returncode == 1, err
        assert "caught SIGINT again: exiting at once, without cleaning up" in err
        assert "Traceback" not in err
        # The next backup into the folder puts right what the hard exit left.
        again = run_tool("virtnbdbackup", "-d", data_vm.name, "-l", "full", "-n", "-o", out)
        assert again.returncode == 0, again.stderr
        assert "which was killed" in again.stderr or "which is no longer running" in again.stderr
        assert not data_vm.has_job() and data_vm.checkpoints() == ["virtnbdbackup.0"]
    finally:
        # What the hard exit left (a job, the new checkpoint) must not stay
        # on the shared VM.
        run_tool("virtnbdbackup", "-d", data_vm.name, "-k", "-o", tmp_path / "k")
        for cp in data_vm.dom.listAllCheckpoints(0):
            cp.delete(0)
