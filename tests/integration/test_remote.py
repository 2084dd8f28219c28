"""Remote backup and restore against a "remote" hypervisor on this host:
libvirt over qemu+ssh to a private sshd, NBD over TCP (and TLS), qemu-nbd
and files over SSH. Restores go to a folder other than the backup's, and
every result is compared bit for bit with the source."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from libvirtnbdbackup.adapters.domainxml import parse_disks
from libvirtnbdbackup.format.reader import read_meta

from .remotelab import SshServer, free_ports, make_pki, qemu_pki, ssh_server
from .vmlab import (
    NAME_PREFIX,
    OVMF_CODE,
    DiskSpec,
    LabVM,
    MiB,
    create_vm,
    destroy,
    hmp_io,
    images_identical,
    remove_vm,
    run_tool,
    sh,
)


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with ssh_server() as server:
        yield server


@pytest.fixture(scope="module")
def tls_dir() -> Iterator[Path]:
    with qemu_pki() as folder:
        if folder is None:
            pytest.skip("/etc/pki/qemu holds this host's own certificates; not replaced")
        yield folder


@pytest.fixture()
def two_disk_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    lab = create_vm(
        conn,
        [
            DiskSpec("vda", 256 * MiB, writes=["write -P 0x31 0 2M", "write -P 0x32 200M 1M"]),
            DiskSpec("vdb", 128 * MiB, writes=["write -P 0x33 64M 3M"]),
        ],
        cdrom=False,
    )
    yield lab
    remove_vm(lab)


def remote_tool(
    sshd: SshServer, tool: str, *args: str | Path, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    nbd = ["-P", str(port)] if port else []
    return run_tool(tool, "-U", sshd.uri, "-n", "-v", *nbd, *args, env=sshd.env)


def remote_backup(sshd: SshServer, vm: LabVM, out: Path, level: str, *args: str) -> str:
    proc = remote_tool(
        sshd, "virtnbdbackup", "-d", vm.name, "-l", level, "-o", out, *args, port=free_ports(2)
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def remote_restore(sshd: SshServer, backup: Path, dest: Path, *args: str) -> str:
    proc = remote_tool(sshd, "virtnbdrestore", "-i", backup, "-o", dest, *args, port=free_ports())
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def qemu_nbd_serving(folder: Path) -> list[str]:
    """qemu-nbd processes still serving an image in ``folder``."""
    out = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(folder) in line]


def test_remote_full_inc_backup_and_restore(small_vm: LabVM, sshd: SshServer, tmp_path: Path):
    vm = small_vm
    out = tmp_path / "backup"
    log = remote_backup(sshd, vm, out, "full")
    assert "runs on 127.0.0.1" in log and "NBD server 127.0.0.1:" in log
    assert "qemu-img info" in log and "-- 127.0.0.1" in log  # image options read over SSH
    hmp_io(vm, "vda", "write -P 0x5c 300M 2M")
    remote_backup(sshd, vm, out, "inc")
    assert (out / "vda.inc.virtnbdbackup.1.data").is_file()
    assert vm.checkpoints() == ["virtnbdbackup.0", "virtnbdbackup.1"]

    dest = vm.folder / "remote-restore"  # on the "remote" host: not the backup folder
    log = remote_restore(sshd, out, dest)
    assert "'qemu-nbd'" in log or "qemu-nbd " in log
    images = list(dest.glob("*.qcow2"))
    assert len(images) == 1 and not list(out.glob("*.qcow2"))
    vm.dom.suspend()
    assert images_identical(vm.images["vda"], images[0])
    vm.dom.resume()
    assert not qemu_nbd_serving(dest)
    assert sshd.connections() == 0


def test_remote_offline_inc_reads_the_bitmap_over_ssh(
    small_vm: LabVM, sshd: SshServer, tmp_path: Path
) -> None:
    vm = small_vm
    out = tmp_path / "backup"
    remote_backup(sshd, vm, out, "full")
    vm.dom.destroy()  # QEMU stores the bitmap in the image as it quits
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x4e 40M 3M", vm.images["vda"])
    log = remote_backup(sshd, vm, out, "inc")
    assert "--bitmap virtnbdbackup.0" in log  # the remote qemu-nbd exposes it
    offline = list(out.glob("vda.inc.virtnbdbackup.0.*.data"))
    assert len(offline) == 1 and read_meta(str(offline[0])).data_size == 3 * MiB
    dest = vm.folder / "remote-restore"
    remote_restore(sshd, out, dest)
    assert images_identical(vm.images["vda"], next(dest.glob("*.qcow2")))


def test_remote_raw_disk_backup_and_restore(vm: LabVM, sshd: SshServer, tmp_path: Path) -> None:
    out = tmp_path / "backup"
    remote_backup(sshd, vm, out, "copy", "-i", "vdc", "--raw")
    dest = vm.folder / "remote-raw"
    log = remote_restore(sshd, out, dest, "--raw")
    assert "--target-image-opts" in log  # written into the remote qemu-nbd
    restored = dest / vm.images["vdc"].name
    assert images_identical(vm.images["vdc"], restored)
    assert restored.stat().st_blocks * 512 < 8 * MiB  # still sparse: 1 MiB of data


def test_remote_offline_backup_serves_each_disk_on_its_own_port(
    two_disk_vm: LabVM, sshd: SshServer, tmp_path: Path
) -> None:
    vm = two_disk_vm
    vm.dom.destroy()
    out = tmp_path / "backup"
    port = free_ports(2)
    proc = remote_tool(sshd, "virtnbdbackup", "-d", vm.name, "-l", "copy", "-o", out, port=port)
    assert proc.returncode == 0, proc.stderr
    assert f"disk vda: served by qemu-nbd at 127.0.0.1:{port}" in proc.stderr
    assert f"disk vdb: served by qemu-nbd at 127.0.0.1:{port + 1}" in proc.stderr
    assert not qemu_nbd_serving(vm.folder)
    for target in ("vda", "vdb"):
        dest = tmp_path / f"restored-{target}"
        proc = run_tool("virtnbdrestore", "-i", out, "-o", dest, "-n", "-d", target)
        assert proc.returncode == 0, proc.stderr
        assert images_identical(vm.images[target], next(dest.glob("*.qcow2")))


def test_concurrent_remote_backups_and_a_port_in_use(
    conn: libvirt.virConnect, small_vm: LabVM, two_disk_vm: LabVM, sshd: SshServer, tmp_path: Path
) -> None:
    two_disk_vm.dom.destroy()  # one online job and one offline qemu-nbd pair at once
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    ports = {small_vm.name: free_ports(), two_disk_vm.name: free_ports(2)}

    def backup(vm: LabVM) -> None:
        results[vm.name] = remote_tool(
            sshd, "virtnbdbackup", "-d", vm.name, "-l", "copy", "-o", tmp_path / vm.name,
            port=ports[vm.name],
        )  # fmt: skip

    threads = [threading.Thread(target=backup, args=(vm,)) for vm in (small_vm, two_disk_vm)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for vm in (small_vm, two_disk_vm):
        assert results[vm.name].returncode == 0, results[vm.name].stderr
        for target, image in vm.images.items():
            dest = tmp_path / f"restored-{vm.name}-{target}"
            proc = run_tool("virtnbdrestore", "-i", tmp_path / vm.name, "-o", dest, "-n",
                            "-d", target)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            assert images_identical(image, next(dest.glob("*.qcow2")))

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        for vm in (small_vm, two_disk_vm):
            out = tmp_path / f"busy-{vm.name}"
            proc = remote_tool(sshd, "virtnbdbackup", "-d", vm.name, "-l", "full", "-o", out,
                               port=busy)  # fmt: skip
            assert proc.returncode == 1
            errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
            assert errors and f"NBD port {busy} on 127.0.0.1 is in use" in errors[-1], errors
            assert "choose a free port with -P" in errors[-1]
            # The disk on the busy port has no file; another one may have finished.
            assert not list(out.glob("vda.*")) and not list(out.glob("*.partial"))
    assert small_vm.checkpoints() == [] and not small_vm.has_job()
    assert not qemu_nbd_serving(two_disk_vm.folder)


def test_tls_backup_offline_backup_and_restore(
    small_vm: LabVM, sshd: SshServer, tls_dir: Path, tmp_path: Path
) -> None:
    vm = small_vm
    out, offline = tmp_path / "backup", tmp_path / "offline"
    log = remote_backup(sshd, vm, out, "full", "--tls", "--tls-cert", str(tls_dir))
    assert "(TLS)" in log
    hmp_io(vm, "vda", "write -P 0x6d 100M 1M")
    # -z: every compression lane opens a TLS connection of its own, to
    # libvirt's export and then to qemu-nbd; the restores decompress over
    # several connections.
    remote_backup(sshd, vm, out, "inc", "-z", "--tls", "--tls-cert", str(tls_dir))
    vm.dom.destroy()
    log = remote_backup(sshd, vm, offline, "copy", "-z", "--tls", "--tls-cert", str(tls_dir))
    assert "tls-creds-x509" in log and "(TLS)" in log
    assert read_meta(str(offline / "vda.copy.data")).is_compressed

    for backup, extra in ((out, []), (offline, ["--compress"])):
        dest = vm.folder / f"restored-{backup.name}"
        log = remote_restore(sshd, backup, dest, "--tls", "--tls-cert", str(tls_dir), *extra)
        assert "tls-creds-x509" in log
        assert images_identical(vm.images["vda"], next(dest.glob("*.qcow2")))
    assert not list(vm.folder.glob("restored-*/*.partial"))


def test_wrong_or_missing_certificates_fail_clearly(
    small_vm: LabVM, sshd: SshServer, tls_dir: Path, tmp_path: Path
) -> None:
    vm = small_vm
    other_ca = tmp_path / "other-ca"
    make_pki(other_ca)  # valid certificates, signed by a CA the hypervisor does not trust
    # The server is trusted, but it does not trust our client certificate. (One
    # folder serves both ends here: it holds the hypervisor's server files too.)
    untrusted_client = tmp_path / "untrusted-client"
    untrusted_client.mkdir()
    for pem in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(tls_dir / pem, untrusted_client)
    for pem in ("client-cert.pem", "client-key.pem"):
        shutil.copy(other_ca / pem, untrusted_client)
    for level, certs in (("full", other_ca), ("copy", other_ca), ("copy", untrusted_client)):
        out = tmp_path / f"backup-{level}-{certs.name}"
        proc = remote_tool(sshd, "virtnbdbackup", "-d", vm.name, "-l", level, "-o", out,
                           "--tls", "--tls-cert", certs, port=free_ports())  # fmt: skip
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert errors and "TLS certificate check failed" in errors[-1], proc.stderr
        assert not list(out.glob("*.data")) and not list(out.glob("*.partial"))
        assert vm.checkpoints() == [] and not vm.has_job()

    plain, dest = tmp_path / "plain", vm.folder / "restore-wrong-certificates"
    remote_backup(sshd, vm, plain, "copy")
    proc = remote_tool(sshd, "virtnbdrestore", "-i", plain, "-o", dest, "--tls", "--tls-cert",
                       untrusted_client, port=free_ports())  # fmt: skip
    assert proc.returncode == 1 and "TLS certificate check failed" in proc.stderr, proc.stderr
    assert not list(dest.glob("*.qcow2*")) and not qemu_nbd_serving(dest)

    # The hypervisor's end lacks its server certificate: qemu-nbd says which file.
    client_only = tmp_path / "client-only"
    client_only.mkdir()
    for pem in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy(tls_dir / pem, client_only)
    proc = remote_tool(sshd, "virtnbdrestore", "-i", plain, "-o", dest, "--tls", "--tls-cert",
                       client_only, port=free_ports())  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert proc.returncode == 1 and errors and "server-cert.pem" in errors[-1], proc.stderr
    assert not list(dest.glob("*.qcow2*")) and not qemu_nbd_serving(dest)

    proc = remote_tool(sshd, "virtnbdbackup", "-d", vm.name, "-l", "copy", "-o",
                       tmp_path / "none", "--tls", "--tls-cert", tmp_path / "nowhere")  # fmt: skip
    assert proc.returncode == 1
    assert "lacks ca-cert.pem, client-cert.pem, client-key.pem" in proc.stderr

    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", "copy", "-o", tmp_path / "local",
                    "--tls", "--tls-cert", tls_dir)  # fmt: skip
    assert proc.returncode == 1 and "with a local URI" in proc.stderr


def test_remote_restore_copies_boot_files_and_defines_the_domain(
    conn: libvirt.virConnect, uefi_vm: LabVM, sshd: SshServer, tmp_path: Path
) -> None:
    vm = uefi_vm
    out = tmp_path / "backup"
    nvram = vm.folder / f"{vm.name}_VARS.fd"
    log = remote_backup(sshd, vm, out, "full")
    assert f"cat -- {nvram}" in log  # fetched over SSH
    assert (out / f"{nvram.name}.virtnbdbackup.0").read_bytes() == nvram.read_bytes()
    assert (out / f"{OVMF_CODE.name}.virtnbdbackup.0").read_bytes() == OVMF_CODE.read_bytes()

    dest = vm.folder / "remote-restore"
    name = f"{NAME_PREFIX}remote-{vm.name[len(NAME_PREFIX) :]}"
    remote_restore(sshd, out, dest, "-D", "-N", name)
    dom = conn.lookupByName(name)
    try:
        xml = dom.XMLDesc(0)
        disks = parse_disks(xml)
        assert [d.target for d in disks] == ["vda"]
        assert Path(disks[0].path or "").parent == dest
        assert images_identical(vm.images["vda"], Path(disks[0].path or ""))
        assert f">{dest / nvram.name}</nvram>" in xml
        assert (dest / nvram.name).read_bytes() == nvram.read_bytes()
        assert (dest / "vmconfig.xml").is_file()
    finally:
        destroy(dom)


def test_unreachable_ssh_fails_before_any_data_moves(
    small_vm: LabVM, sshd: SshServer, tmp_path: Path
) -> None:
    out = tmp_path / "backup"
    proc = remote_tool(sshd, "virtnbdbackup", "-d", small_vm.name, "-l", "full", "-o", out,
                       "--ssh-port", str(free_ports()))  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert errors and "cannot reach root@127.0.0.1 over SSH" in errors[-1]
    assert not list(out.glob("*.data")) and small_vm.checkpoints() == []


SERVE_UNTIL_KILLED = """
import sys, time
from libvirtnbdbackup.adapters import qemu
from libvirtnbdbackup.jobs.remote import Remote, RemoteOptions
remote = Remote(sys.argv[1], RemoteOptions(nbd_port=int(sys.argv[3])))
host = remote.host()
with qemu.nbd_server(sys.argv[2], readonly=True, host=host, tcp=remote.nbd_address(),
                     bind=remote.bind_address()):
    print("serving", flush=True)
    time.sleep(600)
"""


def test_remote_qemu_nbd_stops_when_we_are_killed(
    small_vm: LabVM, sshd: SshServer, tmp_path: Path
) -> None:
    """No client ever connects, and we die without cleaning up: the remote
    qemu-nbd still goes, as its SSH session ends with us."""
    vm = small_vm
    vm.dom.destroy()
    image = vm.images["vda"]
    # Where the killed process leaves its SSH control socket folder.
    scratch = Path(tempfile.mkdtemp(prefix="vnbt-", dir="/var/tmp"))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_UNTIL_KILLED, sshd.uri, str(image), str(free_ports())],
        stdout=subprocess.PIPE,
        text=True,
        env={**sshd.env, "TMPDIR": str(scratch)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
        assert qemu_nbd_serving(vm.folder)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    deadline = time.monotonic() + 15
    while qemu_nbd_serving(vm.folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not qemu_nbd_serving(vm.folder)
    for master in scratch.glob("*/master"):  # the shared connection would idle out; end it now
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={master}", "127.0.0.1"],
                       env=sshd.env, capture_output=True)  # fmt: skip
    shutil.rmtree(scratch, ignore_errors=True)
