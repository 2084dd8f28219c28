"""A "remote" hypervisor on this machine: a private sshd on 127.0.0.1 and
TLS certificates, so the remote code paths (libvirt over SSH, NBD over TCP
and TLS, qemu-nbd and file copies over SSH) really run.

The sshd, its keys and an ``ssh`` wrapper that points the client at this
sshd's host key live in one temporary folder; root's own SSH configuration
is never touched.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

QEMU_PKI = Path("/etc/pki/qemu")
PKI_MARKER = "made-by-virtnbdbackup-tests"


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive TCP ports free on 127.0.0.1.

    Taken below the kernel's ephemeral range: a port from there could be
    given to an outgoing connection (ssh, NBD) before the server binds it.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        first = random.randrange(10000, low - count)
        held = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free TCP ports")


@dataclass
class SshServer:
    folder: Path
    port: int
    key: Path
    proc: subprocess.Popen[bytes]

    @property
    def uri(self) -> str:
        return f"qemu+ssh://root@127.0.0.1:{self.port}/system?keyfile={self.key}"

    @property
    def env(self) -> dict[str, str]:
        """The environment our commands run in: ``ssh`` is the wrapper."""
        return {**os.environ, "PATH": f"{self.folder / 'bin'}:{os.environ['PATH']}"}

    def connections(self) -> int:
        """Session processes sshd runs now (one per open connection)."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return len(out.split())


@contextlib.contextmanager
def ssh_server(extra_config: str = "") -> Iterator[SshServer]:
    """``extra_config``: more sshd_config lines."""
    folder = Path(tempfile.mkdtemp(prefix="vnbt-sshd.", dir="/var/tmp"))
    proc = None
    try:
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", folder / name], check=True
            )
        shutil.copyfile(folder / "client_key.pub", folder / "authorized_keys")
        port = free_ports()
        (folder / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {folder}/host_key\n"
            f"AuthorizedKeysFile {folder}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"PidFile none\nStrictModes no\n{extra_config}"
        )
        host_key = (folder / "host_key.pub").read_text().split()
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        (folder / "ssh_config").write_text(
            f"Host *\n  UserKnownHostsFile {folder}/known_hosts\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        )
        wrapper = folder / "bin" / "ssh"
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {folder}/ssh_config "$@"\n')
        wrapper.chmod(0o755)
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
        proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
            stderr=open(folder / "sshd.log", "wb"),  # noqa: SIM115
        )
        server = SshServer(folder, port, folder / "client_key", proc)
        _wait_for_port(port, proc)
        yield server
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("sshd did not start listening")


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_pki(folder: Path) -> None:
    """A CA and, signed by it, a server certificate for 127.0.0.1 and a
    client certificate, named as libvirt and QEMU expect them."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        "-keyout", folder / "ca-key.pem", "-out", folder / "ca-cert.pem", "-subj", "/CN=vnbt CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for role, usage, names in (
        ("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
        ("client", "clientAuth", "DNS:backup-host"),
    ):
        extensions = folder / f"{role}.ext"
        extensions.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\nsubjectAltName={names}\n"
        )
        request = folder / f"{role}.csr"
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / f"{role}-key.pem",
            "-out", request, "-subj", f"/CN=vnbt {role}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", request, "-CA", folder / "ca-cert.pem",
            "-CAkey", folder / "ca-key.pem", "-CAcreateserial", "-days", "30",
            "-out", folder / f"{role}-cert.pem", "-extfile", extensions,
        )  # fmt: skip
        request.unlink()
        extensions.unlink()
    for pem in folder.glob("*.pem"):
        pem.chmod(0o644)  # QEMU runs as libvirt-qemu and reads the server key


@contextlib.contextmanager
def qemu_pki() -> Iterator[Path | None]:
    """Certificates in /etc/pki/qemu, where libvirt's default qemu.conf lets
    QEMU find them when a backup job starts (no libvirtd restart needed).

    Yields a folder with the CA and client (and server) certificates for
    ``--tls-cert``. Certificates an administrator put there are never
    replaced: None is yielded then. Ours are removed afterwards.
    """
    marker = QEMU_PKI / PKI_MARKER
    if (QEMU_PKI / "ca-cert.pem").exists() and not marker.exists():
        yield None
        return
    created_dir = not QEMU_PKI.exists()
    staging = Path(tempfile.mkdtemp(prefix="vnbt-pki.", dir="/var/tmp"))
    try:
        make_pki(staging)
        QEMU_PKI.mkdir(parents=True, exist_ok=True)
        marker.write_text("test certificates; removed when the tests end\n")
        for pem in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            shutil.copy2(staging / pem, QEMU_PKI / pem)
        yield staging
    finally:
        for pem in ("ca-cert.pem", "server-cert.pem", "server-key.pem", PKI_MARKER):
            (QEMU_PKI / pem).unlink(missing_ok=True)
        if created_dir:
            with contextlib.suppress(OSError):
                QEMU_PKI.rmdir()
                QEMU_PKI.parent.rmdir()
        shutil.rmtree(staging, ignore_errors=True)
