"""qemu-img and qemu-nbd."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import QemuToolError, SshError, VirtnbdError
from ..targets.private import open_private
from .command import end_child, run_tool
from .hosts import LOCAL, Host
from .nbdclient import NbdAddress
from .ssh import SSH_FAILED, unreachable

log = logging.getLogger(__name__)

TLS_ID = "tls0"
REMOTE_SOCKET_PARENT = "/var/tmp"  # where a remote qemu-nbd's private socket folder goes


def run(cmd: list[str], what: str, host: Host = LOCAL) -> str:
    """Run a qemu tool on ``host``; its output."""
    argv = host.command(cmd)

    def ssh_failed(status: int, reason: str) -> None:
        if host.is_remote and status == SSH_FAILED:
            raise SshError(unreachable(host.name, reason))

    where = f" on {host.name}" if host.is_remote else ""
    return run_tool(argv, f"{what}{where}", QemuToolError, _package(argv[0]), ssh_failed)


def _package(tool: str) -> str:
    return "openssh-client" if tool == "ssh" else "qemu-utils"


def image_info(path: str, host: Host = LOCAL) -> dict[str, Any]:
    """``qemu-img info`` of an image that may be in use by a running VM."""
    out = run(
        ["qemu-img", "info", "--output", "json", "--force-share", path],
        f"read image information of {path}",
        host,
    )
    info: dict[str, Any] = json.loads(out)
    return info


def qcow2_create_options(info: dict[str, Any], data_file: str | None = None) -> list[str]:
    """qemu-img create ``-o`` options that recreate the source image's layout."""
    options = []
    specific = info.get("format-specific", {}).get("data", {})
    if info.get("format") == "qcow2":
        if "compat" in specific:
            options.append(f"compat={specific['compat']}")
        if info.get("cluster-size"):
            options.append(f"cluster_size={info['cluster-size']}")
        if "lazy-refcounts" in specific:
            options.append(f"lazy_refcounts={'on' if specific['lazy-refcounts'] else 'off'}")
        if "compression-type" in specific:
            options.append(f"compression_type={specific['compression-type']}")
        if data_file and specific.get("data-file"):
            options.append(f"data_file={data_file}")
            if "data-file-raw" in specific:
                options.append(f"data_file_raw={'on' if specific['data-file-raw'] else 'off'}")
    return options


def create_image(
    path: str,
    size: int | None,
    fmt: str = "qcow2",
    options: list[str] | None = None,
    host: Host = LOCAL,
    *,
    backing: str | None = None,
    backing_fmt: str = "raw",
) -> None:
    """A new image; with ``backing`` an overlay on it (``size`` None: the backing's)."""
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if options:
        cmd += ["-o", ",".join(options)]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt]
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))
    run(cmd, f"create image {path}", host)


def convert_raw(source: str, dest: str) -> None:
    """Copy a raw image into a new private file, keeping it sparse."""
    fd = open_private(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.ftruncate(fd, os.path.getsize(source))
    finally:
        os.close(fd)
    cmd = ["qemu-img", "convert", "-q", "-n", "-f", "raw", "-O", "raw", source, dest]
    run(cmd, f"copy {source}")


def convert_compressed(source: str, dest: str, options: list[str], host: Host = LOCAL) -> None:
    """Copy a qcow2 image into a new one whose clusters are compressed."""
    cmd = ["qemu-img", "convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2"]
    if options:
        cmd += ["-o", ",".join(options)]
    run([*cmd, source, dest], f"compress {source}", host)


def convert_raw_to_nbd(source: str, target: NbdAddress) -> None:
    """Copy a local raw image into an NBD export (of the same size)."""
    if target.socket:
        opts = f"driver=nbd,server.type=unix,server.path={target.socket}"
    else:
        opts = f"driver=nbd,server.type=inet,server.host={target.host},server.port={target.port}"
    cmd = ["qemu-img", "convert", "-q", "-n", "-f", "raw"]
    if target.tls_dir:
        cmd += ["--object", _tls_object(target.tls_dir, "client")]
        opts += f",tls-creds={TLS_ID}"
    run([*cmd, "--target-image-opts", source, opts], f"copy {source} to {target}")


def _tls_object(tls_dir: str, endpoint: str) -> str:
    return f"tls-creds-x509,id={TLS_ID},dir={tls_dir},endpoint={endpoint}"


def image_bitmaps(info: dict[str, Any]) -> dict[str, list[str]]:
    """Persistent bitmaps of a qcow2 image (from ``image_info``) and their flags."""
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: list(b.get("flags", [])) for b in bitmaps}


@contextmanager
def nbd_server(
    image: str,
    fmt: str = "qcow2",
    *,
    readonly: bool = False,
    export: str = "",
    bitmap: str | None = None,
    socket_dir: str | None = None,
    socket: str | None = None,
    host: Host = LOCAL,
    tcp: NbdAddress | None = None,
    bind: str | None = None,
    connections: int = 1,
) -> Iterator[NbdAddress]:
    """Serve ``image`` with qemu-nbd on ``host``; yield where to connect.

    Without ``tcp`` qemu-nbd listens on a private unix socket; with it on
    TCP port ``tcp.port`` of address ``bind``, and with TLS when
    ``tcp.tls_dir`` is set (the server's certificates are read from the
    same folder on ``host``). It takes up to ``connections`` clients at
    once and ends when they have disconnected; it is stopped in any case
    when the block is left, also when this process dies: it lives only as
    long as our pipe to it.
    ``bitmap`` exposes that persistent dirty bitmap as
    ``qemu:dirty-bitmap:NAME``. ``socket`` names the unix socket instead
    (2.x's restore ``-f``); qemu-nbd removes it when it ends.
    """
    workdir = None
    remote_dir = None  # a remote host's private folder for the socket, forwarded over SSH
    args = ["--format", fmt, "--export-name", export, "--shared", str(connections)]
    if tcp is None and host.is_remote:
        remote_dir = host.make_scratch_dir(REMOTE_SOCKET_PARENT, None)
        address = NbdAddress(socket=f"{remote_dir}/nbd.sock")
        args += ["--socket", address.socket or ""]
    elif tcp is None and socket is not None:
        if os.path.exists(socket):
            raise QemuToolError(f"socket {socket} exists already: another NBD server uses it?")
        address = NbdAddress(socket=socket)
        args += ["--socket", socket]
    elif tcp is None:
        workdir = tempfile.mkdtemp(prefix="virtnbdbackup.", dir=socket_dir)
        address = NbdAddress(socket=os.path.join(workdir, "nbd.sock"))
        args += ["--socket", address.socket or ""]
    else:
        address = tcp
        args += ["--bind", bind or tcp.host or "", "--port", str(tcp.port)]
        if tcp.tls_dir:
            args += ["--object", _tls_object(tcp.tls_dir, "server"), "--tls-creds", TLS_ID]
    if readonly:
        args += ["--read-only"]
    else:
        args += ["--cache", "writeback", "--discard", "unmap", "--detect-zeroes", "unmap"]
    if bitmap:
        args += ["--bitmap", bitmap]
    serve = ["sh", "-c", _SERVE, "qemu-nbd", "qemu-nbd", *args, image]
    argv = host.command(serve, dedicated=True)
    log.debug("running %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        if workdir:
            os.rmdir(workdir)
        if remote_dir:
            host.remove_tree(remote_dir)
        raise QemuToolError(f"{argv[0]} is not installed (install {_package(argv[0])})") from None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.wait()
            raise _serve_error(image, host, address, proc.returncode, proc.stderr.read())
        if remote_dir and address.socket:
            with host.forward(address.socket) as local:
                yield NbdAddress(socket=local)
        else:
            yield address
    finally:
        end_child(proc)
        if remote_dir:
            with contextlib.suppress(VirtnbdError):
                host.remove_tree(remote_dir)
        if address.socket and os.path.exists(address.socket) and (workdir or socket):
            os.unlink(address.socket)
        if workdir:
            os.rmdir(workdir)


# Started as ``sh -c _SERVE qemu-nbd ARGV...``: qemu-nbd --fork returns once
# it listens; the shell then waits for our end of its stdin to close (we are
# done, or gone) and stops a server that is still running.
_SERVE = (
    'dir=$(mktemp -d) || exit 1; "$@" --fork --pid-file "$dir/pid" || { rm -rf "$dir"; exit 1; }; '
    'echo ready; read -r _; pid=$(cat "$dir/pid" 2>/dev/null); '
    '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"; exit 0'
)


def _serve_error(
    image: str, host: Host, address: NbdAddress, code: int, stderr: bytes
) -> VirtnbdError:
    lines = stderr.decode(errors="replace").strip().splitlines()
    reason = lines[-1] if lines else f"exit {code}"
    if host.is_remote and code == SSH_FAILED:
        return SshError(unreachable(host.name, reason))
    if "Address already in use" in reason:
        return QemuToolError(
            f"NBD port {address.port} on {host.name} is in use (by another backup or "
            f"restore?): choose a free port with -P ({reason})"
        )
    where = f" on {host.name}" if host.is_remote else ""
    return QemuToolError(f"cannot serve {image} with qemu-nbd{where}: {reason}")
