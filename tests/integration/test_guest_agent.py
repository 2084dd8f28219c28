"""The freeze step against a real guest agent: what is frozen, that every
path out thaws, and that a missing or silent agent costs one warning."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .guestlab import AgentError, Guest
from .vmlab import BIN, LabVM, backup_ok, run_tool


def warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line]


def test_backup_freezes_every_guest_filesystem_then_thaws(guest: Guest, tmp_path: Path) -> None:
    log = backup_ok(guest.vm, tmp_path / "backup", "copy")
    assert "froze 2 guest filesystem(s)" in log
    assert "thawed 2 guest filesystem(s)" in log
    assert guest.freeze_status() == "thawed"
    assert not warnings(log)


def test_freeze_mountpoint_freezes_only_those(guest: Guest, tmp_path: Path) -> None:
    log = backup_ok(guest.vm, tmp_path / "backup", "copy", "-F", "/mnt/vdb")
    assert "froze 1 guest filesystem(s) (/mnt/vdb)" in log
    assert guest.freeze_status() == "thawed"


def test_a_paused_domain_is_not_frozen(guest: Guest, tmp_path: Path) -> None:
    guest.dom.suspend()
    try:
        log = backup_ok(guest.vm, tmp_path / "backup", "copy")
    finally:
        guest.dom.resume()
    assert "is paused: no filesystem freeze" in log
    assert "froze" not in log and not warnings(log)
    assert guest.freeze_status() == "thawed"


def test_a_job_start_failing_after_the_freeze_thaws(guest: Guest, tmp_path: Path) -> None:
    # QEMU cannot create the NBD socket there: libvirt refuses the job
    # while the guest is frozen.
    proc = run_tool(
        "virtnbdbackup", "-d", guest.vm.name, "-l", "full", "-o", tmp_path / "backup", "-n",
        "-f", tmp_path / "no-such-folder" / "nbd.sock",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "froze 2 guest filesystem(s)" in proc.stderr
    assert guest.freeze_status() == "thawed"
    assert guest.vm.checkpoints() == []


def test_sigterm_while_frozen_thaws_and_exits_1(guest: Guest, tmp_path: Path) -> None:
    guest.run("echo 4 > /run/freeze-delay")  # the guest's freeze hook sleeps 4 s
    try:
        proc = subprocess.Popen(
            [str(BIN / "virtnbdbackup"), "-d", guest.vm.name, "-l", "copy", "-n",
             "-o", str(tmp_path / "backup")],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "starting backup job" in line:
                break
        time.sleep(1.5)  # inside the freeze hook's sleep
        proc.send_signal(signal.SIGTERM)
        lines += proc.stderr.readlines()
        assert proc.wait(timeout=120) == 1
    finally:
        guest.run("rm -f /run/freeze-delay")
    log = "".join(lines)
    assert log.index("caught SIGTERM") < log.index("froze 2 guest filesystem(s)"), log
    assert "thawed 2 guest filesystem(s)" in log
    assert guest.freeze_status() == "thawed"
    assert not guest.dom.jobStats(0).get("type")  # no backup job left


def test_a_domain_without_agent_warns_once_and_strict_exits_2(
    small_vm: LabVM, tmp_path: Path
) -> None:
    log = backup_ok(small_vm, tmp_path / "plain", "copy")
    assert len(warnings(log)) == 1 and "crash-consistent" in warnings(log)[0], log
    proc = run_tool(
        "virtnbdbackup", "-d", small_vm.name, "-l", "copy", "-n", "-e", "-o", tmp_path / "strict"
    )
    assert proc.returncode == 2, proc.stderr
    assert (tmp_path / "strict" / "vda.copy.data").is_file()


def test_an_agent_that_does_not_answer_warns_and_the_backup_goes_on(
    guest: Guest, tmp_path: Path
) -> None:
    # Stop the agent for 25 s (a child shell outlives the stop and resumes it).
    guest.agent(
        "guest-exec",
        path="/bin/sh",
        arg=["-c", "p=$(pidof qemu-ga); kill -STOP $p; sleep 25; kill -CONT $p"],
    )
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            guest.ping()  # still answering: the shell has not stopped it yet
            time.sleep(0.2)
        raise AssertionError("the guest agent was not stopped")
    except AgentError:
        pass
    proc = run_tool(
        "virtnbdbackup", "-d", guest.vm.name, "-l", "copy", "-n", "--strict",
        "-o", tmp_path / "backup",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(warnings(proc.stderr)) == 1, proc.stderr
    assert "crash-consistent" in proc.stderr
    assert (tmp_path / "backup" / "vda.copy.data").is_file()
    deadline = time.monotonic() + 60
    while True:  # the agent is back for the tests after this one
        try:
            guest.ping()
            break
        except AgentError:
            assert time.monotonic() < deadline, "the guest agent did not come back"
            time.sleep(1)
    assert guest.freeze_status() == "thawed"


def test_a_freeze_that_hangs_is_given_up_on_then_thawed_when_it_lands(
    guest: Guest, tmp_path: Path
) -> None:
    # The agent answers libvirt's sync, then sits in its freeze hook for
    # longer than the freeze may take (30 s): the backup warns and goes on,
    # and thaws the guest once the late freeze has landed.
    guest.run("echo 35 > /run/freeze-delay")
    try:
        proc = run_tool(
            "virtnbdbackup", "-d", guest.vm.name, "-l", "copy", "-n", "--strict",
            "-o", tmp_path / "backup",
        )  # fmt: skip
    finally:
        guest.run("rm -f /run/freeze-delay")
    assert proc.returncode == 2, proc.stderr
    assert len(warnings(proc.stderr)) == 1, proc.stderr
    assert "did not answer the filesystem freeze within 30 s" in proc.stderr
    assert (tmp_path / "backup" / "vda.copy.data").is_file()
    assert guest.freeze_status() == "thawed"
