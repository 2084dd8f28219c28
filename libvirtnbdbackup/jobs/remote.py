"""Backups and restores of a remote hypervisor: where to reach it over SSH
and where its NBD servers listen.

A libvirt URI with a host part (``qemu+ssh://root@hv1/system``) means the
domain runs elsewhere: commands and files then go over SSH, and so do the
disks by default (NBD on a unix socket of the hypervisor, forwarded by
OpenSSH); -P, -I or --tls put NBD on TCP as 2.47 did, with TLS for
--tls. Everything else is local, over unix sockets.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..adapters.hosts import LOCAL, Host
from ..adapters.nbdclient import DEFAULT_PORT, NbdAddress
from ..adapters.ssh import SshHost
from ..errors import UsageError

DEFAULT_TLS_DIR = "/etc/pki/qemu"
CLIENT_TLS_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")
SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
# ssh adds a random suffix to the control socket's path while creating it;
# a unix socket path has at most 107 bytes.
MAX_CONTROL_PATH = 80


@dataclass(frozen=True)
class RemoteOptions:
    ssh_user: str | None = None
    ssh_port: int | None = None
    ssh_key: str | None = None
    nbd_port: int = DEFAULT_PORT
    nbd_ip: str | None = None  # address the remote NBD server binds to
    tls: bool = False
    tls_cert: str = DEFAULT_TLS_DIR
    # NBD on a unix socket of the hypervisor, forwarded over SSH: the default.
    # False (TCP, as in 2.47) when -P, -I or --tls asked for it.
    over_ssh: bool = True


@dataclass(frozen=True)
class LibvirtUri:
    host: str | None
    user: str | None
    port: int | None
    transport: str | None
    keyfile: str | None

    @classmethod
    def parse(cls, uri: str) -> LibvirtUri:
        parts = urlsplit(uri)
        transport = parts.scheme.partition("+")[2] or None
        keyfile = parse_qs(parts.query).get("keyfile", [None])[-1]
        try:
            port = parts.port
        except ValueError:
            raise UsageError(f"libvirt URI {uri}: the port is not a number") from None
        return cls(parts.hostname or None, parts.username, port, transport, keyfile)

    @property
    def is_remote(self) -> bool:
        return self.host is not None


class Remote:
    """How one job reaches the hypervisor named by a libvirt URI."""

    def __init__(self, uri: str, opts: RemoteOptions) -> None:
        self.uri = LibvirtUri.parse(uri)
        self.opts = opts
        if opts.tls and not self.uri.is_remote:
            raise UsageError(
                "--tls protects the NBD transfer from a remote hypervisor; with a local URI "
                "the data goes over a unix socket: give -U qemu+ssh://HOST/system"
            )
        if opts.tls:
            check_client_certificates(opts.tls_cert)
        if not 0 < opts.nbd_port < 65536:
            raise UsageError(f"-P {opts.nbd_port}: not a TCP port")

    @property
    def is_remote(self) -> bool:
        return self.uri.is_remote

    @property
    def over_ssh(self) -> bool:
        """Whether NBD travels over a unix socket forwarded through SSH."""
        return self.uri.is_remote and self.opts.over_ssh and not self.opts.tls

    @property
    def over_tcp(self) -> bool:
        """Whether the remote NBD servers listen on TCP (-P, -I, --tls)."""
        return self.uri.is_remote and not self.over_ssh

    def describe_transport(self) -> str:
        """For the log: how the disks travel, and what changed from 2.47."""
        if self.over_ssh:
            return (
                "disks travel over NBD on a unix socket of the hypervisor, forwarded through "
                "the SSH connection: authenticated and encrypted (the default; 2.47 used plain "
                "TCP, which -P, -I or --tls select)"
            )
        if self.opts.tls:
            return "disks travel over NBD on TCP with TLS (--tls)"
        return (
            "disks travel over plain NBD on TCP (-P/-I given): unauthenticated and "
            "unencrypted, anyone who reaches the port reads the disk; prefer the default "
            "(SSH) or --tls on a network you do not trust"
        )

    def host(self) -> Host:
        """This machine, or the hypervisor over SSH (checked to answer); the
        caller closes it."""
        if not self.uri.is_remote:
            return LOCAL
        folder = tempfile.mkdtemp(prefix="virtnbdbackup-ssh.")
        control = os.path.join(folder, "master")
        if len(control) > MAX_CONTROL_PATH:  # a long TMPDIR: no shared connection
            os.rmdir(folder)
            host = self.ssh_host()
        else:
            host = dataclasses.replace(self.ssh_host(), control_path=control)
        try:
            host.check()
        except BaseException:
            host.close()
            raise
        return host

    def ssh_host(self) -> SshHost:
        """SSH options not given default to those of an SSH URI."""
        assert self.uri.host is not None
        over_ssh = self.uri.transport in SSH_TRANSPORTS
        return SshHost(
            self.uri.host,
            user=self.opts.ssh_user or self.uri.user,
            port=self.opts.ssh_port or (self.uri.port if over_ssh else None),
            key=self.opts.ssh_key or (self.uri.keyfile if over_ssh else None),
        )

    def bind_address(self) -> str:
        """The address the remote NBD server listens on."""
        assert self.uri.host is not None
        return self.opts.nbd_ip or self.uri.host

    def nbd_address(self, offset: int = 0) -> NbdAddress:
        """Where this host connects to the remote NBD server (port ``-P`` +
        ``offset``): the bound address, or the URI's host for a wildcard."""
        assert self.uri.host is not None
        port = self.opts.nbd_port + offset
        if port > 65535:
            raise UsageError(f"-P {self.opts.nbd_port}: port {port} is past 65535")
        connect = self.bind_address()
        if _is_wildcard(connect):
            connect = self.uri.host
        tls_dir = self.opts.tls_cert if self.opts.tls else None
        return NbdAddress(host=connect, port=port, tls_dir=tls_dir)


def _is_wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def check_client_certificates(folder: str) -> None:
    missing = [name for name in CLIENT_TLS_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UsageError(
            f"--tls: {folder} lacks {', '.join(missing)}; it needs the CA certificate and a "
            "client certificate and key signed by it (give the folder with --tls-cert)"
        )
