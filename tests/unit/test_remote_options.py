"""Which URIs are remote, how the hypervisor is reached, where NBD listens."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from libvirtnbdbackup.adapters.domainxml import Disk
from libvirtnbdbackup.adapters.nbdclient import NbdAddress
from libvirtnbdbackup.adapters.ssh import SshHost
from libvirtnbdbackup.adapters.virt import backup_xml
from libvirtnbdbackup.errors import UsageError
from libvirtnbdbackup.jobs.remote import LibvirtUri, Remote, RemoteOptions


@pytest.mark.parametrize(
    ("uri", "host", "user", "port", "transport"),
    [
        ("qemu:///system", None, None, None, None),
        ("qemu+unix:///system?socket=/x", None, None, None, "unix"),
        ("qemu+ssh://root@hv1/system", "hv1", "root", None, "ssh"),
        ("qemu+ssh://admin@10.0.0.5:2222/system?keyfile=/k", "10.0.0.5", "admin", 2222, "ssh"),
        ("qemu+tls://hv2/system", "hv2", None, None, "tls"),
        ("qemu+ssh://root@[fd00::5]/system", "fd00::5", "root", None, "ssh"),
    ],
)
def test_uri_parts(
    uri: str, host: str | None, user: str | None, port: int | None, transport: str | None
) -> None:
    parsed = LibvirtUri.parse(uri)
    assert (parsed.host, parsed.user, parsed.port, parsed.transport) == (
        host,
        user,
        port,
        transport,
    )
    assert parsed.is_remote is (host is not None)


def test_ssh_settings_come_from_the_uri_unless_given() -> None:
    uri = "qemu+ssh://admin@hv1:2222/system?keyfile=/root/.ssh/hv"
    host = Remote(uri, RemoteOptions()).ssh_host()
    assert host.ssh_argv() == [
        "ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-p", "2222",
        "-i", "/root/.ssh/hv", "-o", "IdentitiesOnly=yes", "-l", "admin", "--", "hv1",
    ]  # fmt: skip
    assert host.command(["cat", "--", "/a b"]) == [*host.ssh_argv(), "cat -- '/a b'"]
    given = Remote(uri, RemoteOptions(ssh_user="bk", ssh_port=22, ssh_key="/k")).ssh_host()
    assert given == SshHost("hv1", "bk", 22, "/k")
    # The port of a qemu+tls URI is libvirtd's, not SSH's.
    assert Remote("qemu+tls://hv1:16514/system", RemoteOptions()).ssh_host() == SshHost("hv1")


def test_nbd_addresses() -> None:
    remote = Remote("qemu+ssh://root@hv1/system", RemoteOptions(nbd_port=10900))
    assert remote.bind_address() == "hv1"
    assert remote.nbd_address(1) == NbdAddress(host="hv1", port=10901)
    wildcard = Remote("qemu+ssh://root@hv1/system", RemoteOptions(nbd_ip="0.0.0.0"))
    assert wildcard.bind_address() == "0.0.0.0" and wildcard.nbd_address().host == "hv1"
    dedicated = Remote("qemu+ssh://root@hv1/system", RemoteOptions(nbd_ip="192.168.9.1"))
    assert dedicated.nbd_address().host == "192.168.9.1"
    with pytest.raises(UsageError, match="past 65535"):
        Remote("qemu+ssh://hv1/system", RemoteOptions(nbd_port=65535)).nbd_address(1)


def test_nbd_uris() -> None:
    assert NbdAddress(socket="/run/x.sock").uri("vda") == "nbd+unix:///vda?socket=/run/x.sock"
    assert NbdAddress(host="hv1", port=10809).uri("vda") == "nbd://hv1:10809/vda"
    assert NbdAddress(host="fd00::5", port=1, tls_dir="/p").uri("") == "nbds://[fd00::5]:1/"


def test_tls_needs_a_remote_uri_and_client_certificates(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="local URI"):
        Remote("qemu:///system", RemoteOptions(tls=True, tls_cert=str(tmp_path)))
    (tmp_path / "ca-cert.pem").write_text("x")
    with pytest.raises(UsageError, match=r"lacks client-cert\.pem, client-key\.pem"):
        Remote("qemu+ssh://hv1/system", RemoteOptions(tls=True, tls_cert=str(tmp_path)))


def test_backup_xml_servers() -> None:
    disk = Disk("vda", "disk", "file", "qcow2", "/img/vda.qcow2")
    scratch = {"vda": "/var/tmp/s"}
    local = ET.fromstring(backup_xml([disk], [disk], NbdAddress(socket="/s"), scratch))
    assert local.find("server").attrib == {"transport": "unix", "socket": "/s"}  # type: ignore[union-attr]
    tcp = NbdAddress(host="hv1", port=10809, tls_dir="/etc/pki/qemu")
    remote = ET.fromstring(backup_xml([disk], [disk], tcp, scratch, None, bind="10.1.1.1"))
    assert remote.find("server").attrib == {  # type: ignore[union-attr]
        "transport": "tcp",
        "name": "10.1.1.1",
        "port": "10809",
        "tls": "yes",
    }


@pytest.mark.parametrize(
    ("argv", "over_ssh", "port"),
    [
        ([], True, 10809),
        (["-P", "10900"], False, 10900),
        (["-I", "192.0.2.7"], False, 10809),
        (["--tls"], False, 10809),
    ],
)
def test_remote_transport_is_ssh_unless_tcp_is_asked_for(
    argv: list[str], over_ssh: bool, port: int
) -> None:
    from libvirtnbdbackup.cli.backup import build_parser
    from libvirtnbdbackup.cli.common import remote_options

    args = build_parser().parse_args(["-d", "vm", "-o", "/x", *argv])
    opts = remote_options(args)
    assert (opts.over_ssh, opts.nbd_port) == (over_ssh, port)
    if not opts.tls:  # --tls would check the client certificates here
        assert Remote("qemu+ssh://root@hv1/system", opts).over_ssh == over_ssh
    assert not Remote("qemu:///system", RemoteOptions()).over_ssh
