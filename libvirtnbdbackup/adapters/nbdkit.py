"""nbdkit serving a backup chain with the package's python plugin."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ..errors import NbdError
from ..targets.private import PRIVATE_FILE

log = logging.getLogger(__name__)

# Loaded by nbdkit's embedded Python, never imported here (it needs nbdkit's module).
PLUGIN = str(Path(__file__).resolve().parents[1] / "nbdkitplugin.py")
_EXCEPTION_PREFIX = re.compile(r"^\s*[\w.]*(Error|Exception): ")
START_TIMEOUT = 120.0
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last one a NUL
# Decompressed LZ4 pieces come and go in slices of 1 MiB. By default glibc
# maps and unmaps such allocations, or keeps freed ones per thread arena, and
# the page faults cost more than the decompression (measured: about 1.7
# times the read throughput of a compressed chain with these settings). One
# arena that keeps freed memory lets the slices reuse it; the piece cache
# bounds how much is in use.
MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_ARENA_MAX": "1",
}


LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this host's loopback only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


@dataclass(frozen=True)
class Endpoint:
    """Where an NBD server listens: a unix socket, or a TCP host and port
    (with TLS when ``tls_dir`` names the certificate folder: server files
    for nbdkit, client files for our own connections through it)."""

    socket: str | None = None
    host: str | None = None
    port: int | None = None
    tls_dir: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``unix:PATH``, ``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6) or
        ``:PORT`` (loopback)."""
        if text.startswith("unix:"):
            path = text.removeprefix("unix:")
            if not path:
                raise ValueError("unix: needs a socket path")
            path = os.path.abspath(path)
            if len(path.encode()) > MAX_SOCKET_PATH:
                raise ValueError(
                    f"socket path {path} is longer than the {MAX_SOCKET_PATH} bytes a unix "
                    "socket allows; choose a shorter one"
                )
            return cls(socket=path)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{text!r} is neither unix:PATH nor HOST:PORT")
        return cls(host=host.strip("[]") or LOOPBACK, port=int(port))

    def uri(self, export: str) -> str:
        if self.socket:
            return f"nbd+unix:///{export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        if self.tls_dir:
            return f"nbds://{host}:{self.port}/{export}?tls-certificates={quote(self.tls_dir)}"
        return f"nbd://{host}:{self.port}/{export}"

    def nbdkit_args(self) -> list[str]:
        if self.socket:
            return ["--unix", self.socket]
        args = ["--ipaddr", str(self.host), "--port", str(self.port)]
        if self.tls_dir:  # clients need a certificate of the same CA, too
            args += ["--tls=require", f"--tls-certificates={self.tls_dir}", "--tls-verify-peer"]
        return args


# Tells the plugin, which runs in nbdkit's Python, where this Python finds
# zlib-ng: its Adler-32 is several times as fast as zlib's (format/checksum.py).
SITE_VARIABLE = "VIRTNBDBACKUP_SITE"


def _checksum_site() -> str | None:
    """``<python version>:<folder holding zlib_ng>``, or None without zlib-ng."""
    try:
        import zlib_ng
    except ImportError:
        return None
    folder = os.path.dirname(os.path.dirname(os.path.abspath(zlib_ng.__file__)))
    return f"{sys.version_info.major}.{sys.version_info.minor}:{folder}"


class NbdkitServer:
    """One nbdkit process serving one disk's chain as export ``export``.

    Writes go to nbdkit's cow filter (a temporary overlay nbdkit deletes on
    exit) unless ``readonly``. nbdkit dies with its parent
    (``--exit-with-parent``), so a killed virtnbdmap leaves no server behind.
    """

    def __init__(
        self,
        files: list[str],
        export: str,
        endpoint: Endpoint,
        *,
        readonly: bool,
        threads: int,
        workdir: Path,
        cache: str | None = None,
        blocksize: int | None = None,
        hexdump: str | None = None,
        allow_uids: tuple[int, ...] = (),
    ) -> None:
        """``blocksize``: the largest request passed to the plugin (nbdkit's
        blocksize filter splits bigger ones); ``hexdump``: a file the plugin
        appends a line to for every read (offset, length, first bytes)."""
        self.files = files
        self.export = export
        self.endpoint = endpoint
        self.readonly = readonly
        self.threads = threads
        self.pidfile = workdir / f"nbdkit.{export}.pid"
        self.errfile = workdir / f"nbdkit.{export}.log"
        self.cache = cache
        self.blocksize = blocksize
        self.hexdump = hexdump
        self.allow_uids = allow_uids  # on a unix socket: users besides ours that may connect
        self.workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return self.endpoint.uri(self.export)

    def command(self) -> list[str]:
        cmd = ["nbdkit", "--foreground", "--exit-with-parent", "--pidfile", str(self.pidfile)]
        cmd += self.endpoint.nbdkit_args()
        if self.endpoint.socket:
            cmd += ["--filter=ip"]  # outermost: checks the peer before anything else
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.readonly:
            cmd += ["--readonly"]
        else:
            cmd += ["--filter=cow"]
        if self.blocksize:
            cmd += ["--filter=blocksize"]
        cmd += ["python", PLUGIN, f"export={self.export}"]
        if self.endpoint.socket:
            # nbdkit makes its socket 0755, whatever the umask; the ip filter
            # refuses every peer but these users (SO_PEERCRED), root included.
            uids = sorted({os.geteuid(), *self.allow_uids})
            cmd += [*(f"allow=uid:{uid}" for uid in uids), "deny=all"]
        cmd += [f"file={f}" for f in self.files]
        if self.cache:
            cmd += [f"cache={self.cache}"]
        if self.blocksize:
            cmd += [f"maxdata={self.blocksize}"]
        if self.hexdump:
            cmd += [f"hexdump={self.hexdump}"]
        return cmd

    def start(self) -> None:
        cmd = self.command()
        log.debug("running %s", " ".join(cmd))
        env = dict(os.environ, TMPDIR=str(self.workdir))  # the cow overlay lives here
        site = _checksum_site()
        if site is not None:
            env[SITE_VARIABLE] = site
        for key, value in MALLOC_TUNING.items():
            env.setdefault(key, value)
        try:
            with open(self.errfile, "wb") as err:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, umask=0o077
                )
        except FileNotFoundError:
            raise NbdError(
                "nbdkit is not installed (install nbdkit and nbdkit-plugin-python)"
            ) from None
        deadline = time.monotonic() + START_TIMEOUT
        while not self.pidfile.exists():
            if self._proc.poll() is not None:
                raise NbdError(f"nbdkit for {self.export} failed to start: {self._error_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise NbdError(f"nbdkit for {self.export} did not start within {START_TIMEOUT}s")
            time.sleep(0.02)
        if self.endpoint.socket:
            os.chmod(self.endpoint.socket, PRIVATE_FILE)
        log.info("nbdkit (pid %d) serves %s at %s", self._proc.pid, self.export, self.uri)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def failure(self) -> str:
        """Why nbdkit ended, for a server that is no longer alive."""
        code = self._proc.returncode if self._proc else None
        return f"nbdkit for {self.export} ended (exit {code}): {self._error_text()}"

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        for leftover in (self.pidfile, self.errfile):
            leftover.unlink(missing_ok=True)
        if self.endpoint.socket:
            Path(self.endpoint.socket).unlink(missing_ok=True)

    def _error_text(self) -> str:
        try:
            lines = self.errfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        # The plugin's exceptions end with the message that matters.
        errors = [line.strip() for line in lines if line.strip()]
        return _EXCEPTION_PREFIX.sub("", errors[-1]) if errors else "no output"
