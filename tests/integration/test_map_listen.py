"""virtnbdmap serves a backup to nobody it was not asked to: TCP on
loopback unless told otherwise, another address only with --tls or
--insecure, unix sockets only their owner (and root) can connect to."""

from __future__ import annotations

import contextlib
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from .remotelab import free_ports, make_pki
from .test_hostile_sets import write_set
from .vmlab import BIN, run_tool

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
DATA = b"\x5a" * 4096  # what write_set puts at offset 0


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("map-listen") / "set"
    write_set(folder, "vda")
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    make_pki(folder)
    return folder


@contextlib.contextmanager
def serving(*args: str | Path) -> Iterator[str]:
    """virtnbdmap serving until the block ends; its log so far."""
    proc = subprocess.Popen(
        [str(BIN / "virtnbdmap"), "-r", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready:"):
                break
        else:
            raise AssertionError(f"virtnbdmap ended: {proc.wait()} {proc.stderr.read()}")  # type: ignore[union-attr]
        yield ""
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reads(uri: str) -> bytes:
    handle = nbd.NBD()
    handle.set_uri_allow_local_file(True)  # the certificate folder in nbds:// URIs
    handle.connect_uri(uri)
    try:
        return bytes(handle.pread(len(DATA), 0))
    finally:
        handle.shutdown()


def nobody_reads(uri: str) -> bool:
    proc = subprocess.run([*AS_NOBODY, "nbdcopy", uri, "-"], capture_output=True, timeout=60)
    return proc.returncode == 0 and proc.stdout[: len(DATA)] == DATA


@pytest.mark.parametrize(
    "listen",
    [
        ["--listen", "0.0.0.0:{port}"],
        ["--listen", "192.0.2.2:{port}"],
        ["-l", "0.0.0.0", "-p", "{port}"],
    ],
)
def test_a_network_address_without_tls_is_refused(backup: Path, listen: list[str]) -> None:
    port = free_ports()
    args = [a.format(port=port) for a in listen]
    # Not refused, virtnbdmap would serve until stopped: the timeout ends it then.
    proc = run_tool("virtnbdmap", "-i", backup, "-r", *args, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert "not a loopback address" in proc.stderr and "--tls" in proc.stderr


def test_port_alone_listens_on_loopback(backup: Path) -> None:
    port = free_ports()
    with serving("-i", backup, "--listen", f":{port}"):
        assert reads(f"nbd://127.0.0.1:{port}/vda") == DATA
        with pytest.raises(nbd.Error):
            reads(f"nbd://192.0.2.2:{port}/vda")


def test_tls_listener_serves_only_clients_with_a_certificate(backup: Path, pki: Path) -> None:
    port = free_ports()
    with serving("-i", backup, "--listen", f"0.0.0.0:{port}", "--tls", "--tls-cert", pki):
        assert reads(f"nbds://127.0.0.1:{port}/vda?tls-certificates={pki}") == DATA
        with pytest.raises(nbd.Error):
            reads(f"nbd://127.0.0.1:{port}/vda")  # plain NBD: refused by the TLS server
        assert not nobody_reads(f"nbd://192.0.2.2:{port}/vda")


def test_insecure_is_the_explicit_opt_in(backup: Path) -> None:
    port = free_ports()
    with serving("-i", backup, "--listen", f"0.0.0.0:{port}", "--insecure"):
        assert reads(f"nbd://192.0.2.2:{port}/vda") == DATA


def test_unix_socket_only_for_its_owner(backup: Path, tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o1777)  # a folder anyone may reach: only the socket's mode protects it
    tmp_path.chmod(0o755)
    sock = folder / "vda.sock"
    with serving("-i", backup, "--listen", f"unix:{sock}"):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert reads(f"nbd+unix:///vda?socket={sock}") == DATA
        assert not nobody_reads(f"nbd+unix:///vda?socket={sock}")


def test_tls_does_not_go_with_a_block_device(backup: Path, pki: Path) -> None:
    port = free_ports()
    args = ["-l", "0.0.0.0", "-p", str(port), "--tls", "--tls-cert", pki]
    proc = run_tool("virtnbdmap", "-i", backup, "-r", *args, timeout=30)
    assert proc.returncode == 1 and "--tls serves an export only" in proc.stderr, proc.stderr
