"""The default transport of remote backups and restores: NBD on a unix
socket of the hypervisor, forwarded over SSH. No port is opened on the
hypervisor; -P, -I and --tls still select TCP as in 2.47."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .remotelab import SshServer, free_ports, ssh_server
from .test_remote import qemu_nbd_serving
from .vmlab import LabVM, hmp_io, images_identical, run_tool, sh

FORWARDED = "forwarded through the SSH connection"


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with ssh_server() as server:
        yield server


def remote(sshd: SshServer, tool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_tool(tool, "-U", sshd.uri, "-n", "-v", *args, env=sshd.env)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_remote_backup_and_restore_default_to_nbd_over_ssh(
    small_vm: LabVM, sshd: SshServer, tmp_path: Path
) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    log = ok(remote(sshd, "virtnbdbackup", "-d", vm.name, "-l", "full", "-o", out))
    assert FORWARDED in log and "NBD server 127.0.0.1:" not in log
    assert "virtnbdbackup.sock of 127.0.0.1 forwarded to " in log
    hmp_io(vm, "vda", "write -P 0x5d 200M 2M")
    log = ok(remote(sshd, "virtnbdbackup", "-d", vm.name, "-l", "inc", "-o", out, "-z"))
    assert FORWARDED in log
    dest = vm.folder / "ssh-restore"
    log = ok(remote(sshd, "virtnbdrestore", "-i", out, "-o", dest))
    assert FORWARDED in log and "--port" not in log
    vm.dom.suspend()
    assert images_identical(vm.images["vda"], next(dest.glob("*.qcow2")))
    vm.dom.resume()
    assert not qemu_nbd_serving(dest)
    assert not list(Path("/tmp").glob("virtnbdbackup-fwd.*/nbd.sock")), "forwards are closed"


def test_offline_and_raw_disks_over_ssh(vm: LabVM, sshd: SshServer, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    log = ok(remote(sshd, "virtnbdbackup", "-d", vm.name, "-l", "copy", "-i", "vdc", "--raw",
                    "-o", out))  # fmt: skip
    assert FORWARDED in log
    dest = vm.folder / "ssh-raw"
    ok(remote(sshd, "virtnbdrestore", "-i", out, "-o", dest, "--raw"))
    assert images_identical(vm.images["vdc"], dest / vm.images["vdc"].name)


def test_shut_off_domain_over_ssh(small_vm: LabVM, sshd: SshServer, tmp_path: Path) -> None:
    vm = small_vm
    vm.dom.destroy()
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x6e 30M 1M", vm.images["vda"])
    out = tmp_path / "backup"
    log = ok(remote(sshd, "virtnbdbackup", "-d", vm.name, "-l", "copy", "-o", out, "-z"))
    served = [line for line in log.splitlines() if "disk vda: served by qemu-nbd at " in line]
    assert len(served) == 1 and "/virtnbdbackup-fwd." in served[0], log
    proc = run_tool("virtnbdrestore", "-i", out, "-o", tmp_path / "r", "-n")
    assert proc.returncode == 0, proc.stderr
    assert images_identical(vm.images["vda"], next((tmp_path / "r").glob("*.qcow2")))


def test_sshd_that_forbids_forwarding_names_the_way_out(
    small_vm: LabVM, tmp_path: Path
) -> None:
    """2.47's command line still works where sshd forbids forwarding: -P
    gives its TCP transport, and the default says so in one line."""
    with ssh_server("AllowStreamLocalForwarding no\n") as strict:
        proc = remote(strict, "virtnbdbackup", "-d", small_vm.name, "-l", "copy", "-o",
                      tmp_path / "a")  # fmt: skip
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert proc.returncode == 1 and len(errors) == 1, proc.stderr
        assert "AllowStreamLocalForwarding" in errors[0] and "-P PORT" in errors[0]
        assert not small_vm.has_job()
        ok(remote(strict, "virtnbdbackup", "-d", small_vm.name, "-l", "copy", "-o",
                  tmp_path / "b", "-P", str(free_ports())))  # fmt: skip
