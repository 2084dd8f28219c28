"""virtnbdmap: serve backup chains over NBD, as block devices, or boot them.

Each disk's chain is served by its own nbdkit (the package's python
plugin); on top of it go a block device (/dev/nbdX or a loop device over
nbdfuse), nothing (``--listen``), or a transient libvirt domain whose disks
are qcow2 overlays on the exports (``--boot``). Everything set up is torn
down in reverse order when the job ends, whatever ends it; the overlays of
``--boot`` are kept for the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pwd
import shutil
import signal
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..adapters import qemu
from ..adapters.blockdev import FuseLoopDevice, KernelNbdDevice, kernel_has_nbd, partitions
from ..adapters.domainxml import adjust_config
from ..adapters.hosts import LOCAL
from ..adapters.nbdkit import LOOPBACK, Endpoint, NbdkitServer, is_loopback
from ..adapters.virt import Domain, Hypervisor
from ..errors import DomainError, NbdError, TargetError, UsageError, VirtnbdError
from ..format.index import open_index
from ..interrupts import Cancel
from ..targets.private import TRAVERSE_DIR, make_private_dir, restrict
from .backupset import (
    DataFile,
    chains,
    data_file,
    latest_config,
    ordered_sequence,
    saved_boot_files,
    scan,
)

log = logging.getLogger(__name__)

RUN_DIR = Path(os.environ.get("VIRTNBDMAP_RUN_DIR", "/run/virtnbdmap"))
WORK_PARENT = "/var/tmp"  # reachable by the libvirt-qemu user (for --boot)
QEMU_USER = "libvirt-qemu"
POLL_SECONDS = 0.2


@dataclass
class MapOptions:
    files: list[str]  # -f, chain order
    input: str | None = None  # backup folder
    disk: str | None = None
    until: str | None = None
    device: str | None = None  # /dev/nbdX, "loop", or None for the best available
    export_name: str | None = None
    listen: str | None = None  # serve only, at unix:PATH or HOST:PORT
    listen_address: str | None = None  # 2.x -l/-p: TCP address of the server
    listen_port: int | None = None
    tls: bool = False  # TCP listeners with TLS, clients authenticated by certificate
    tls_cert: str = "/etc/pki/qemu"
    insecure: bool = False  # a non-loopback TCP listener without TLS, asked for
    readonly: bool = False
    threads: int = 1  # nbdkit threads per connection; 0: nbdkit's default (16)
    cache: str | None = None
    blocksize: int | None = None  # -b: largest request passed to the plugin
    hexdump: str | None = None  # -H: file the plugin logs each read to
    boot: bool = False
    output: str | None = None  # --boot: folder for the overlays
    name: str | None = None  # --boot: domain name
    uri: str = "qemu:///system"
    user: str | None = None
    password: str | None = None


@dataclass
class MappedDisk:
    disk: str
    files: list[DataFile]
    server: NbdkitServer | None = None


class MapJob:
    def __init__(self, opts: MapOptions, cancel: Cancel) -> None:
        self.opts = opts
        self.cancel = cancel
        self.workdir: Path | None = None
        self._watched: list[NbdkitServer | FuseLoopDevice | KernelNbdDevice] = []

    def run(self) -> None:
        disks = self._sequences()
        with self.cancel.scope(), contextlib.ExitStack() as stack:
            self.workdir = Path(tempfile.mkdtemp(prefix="virtnbdmap.", dir=WORK_PARENT))
            stack.callback(shutil.rmtree, self.workdir, True)
            if self.opts.boot:
                os.chmod(self.workdir, 0o711)  # qemu reaches the sockets in it
            for mapped in disks:
                self._serve(mapped, stack)
            record: dict[str, object] = {"pid": os.getpid(), "exports": {}}
            for mapped in disks:
                if mapped.server is not None:
                    print(f"export {mapped.disk}: {mapped.server.uri}", flush=True)
            if self.opts.boot:
                record["domain"] = self._boot(disks, stack)
            elif not self.opts.listen:
                record["device"] = self._block_device(disks[0], stack)
            record["exports"] = {m.server.export: m.server.uri for m in disks if m.server}
            _register(record)
            stack.callback(_unregister)
            print("ready: press Ctrl-C or run 'virtnbdmap --stop' to unmap", flush=True)
            # A signal is the normal end of the wait: it must not cut the
            # unmapping short (a second one still exits at once).
            self.cancel.defer()
            self._wait()
            log.info("unmapping")

    # chains

    def _sequences(self) -> list[MappedDisk]:
        if self.opts.files:
            if self.opts.until or self.opts.input:
                raise UsageError("-f names the files itself: --until and -i do not apply")
            paths = [Path(f) for f in self.opts.files]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise TargetError(f"no such data file: {', '.join(missing)}")
            files = ordered_sequence([data_file(p) for p in paths], option="-f")
            return [MappedDisk(files[0].disk, files)]
        if not self.opts.input:
            raise UsageError("give the data files with -f, or a backup folder with -i")
        found = scan(self.opts.input)
        disk_chains = chains(found)
        if self.opts.disk:
            if self.opts.disk not in disk_chains:
                raise UsageError(
                    f"{self.opts.input} holds no disk {self.opts.disk}; "
                    f"it holds {', '.join(disk_chains) or 'none'}"
                )
            disk_chains = {self.opts.disk: disk_chains[self.opts.disk]}
        elif len(disk_chains) > 1 and not self.opts.boot:
            raise UsageError(
                f"{self.opts.input} holds disks {', '.join(disk_chains)}: choose one with --disk"
            )
        if not disk_chains:
            raise TargetError(f"{self.opts.input} holds no data files")
        result = []
        for disk, chain in disk_chains.items():
            sequence = chain.sequence(self.opts.until)
            log.info("disk %s: serving %s", disk, " + ".join(f.name for f in sequence))
            result.append(MappedDisk(disk, sequence))
        return result

    # nbdkit

    def _serve(self, mapped: MappedDisk, stack: contextlib.ExitStack) -> None:
        assert self.workdir is not None
        if mapped.files[0].meta is None:
            if self.opts.boot:
                return  # a raw image backs its overlay directly
            raise UsageError(
                f"{mapped.files[0].path} is a raw image, not a stream: use it as it is "
                "(e.g. losetup --read-only --partscan --find --show FILE)"
            )
        started = time.monotonic()
        for f in mapped.files:
            with open(f.path, "rb") as fh:
                open_index(str(f.path), fh)
        export = mapped.disk if self.opts.boot else self.opts.export_name or mapped.disk
        if self.opts.boot:
            endpoint = Endpoint(socket=str(self.workdir / f"{mapped.disk}.sock"))
        elif self.opts.listen:
            try:
                endpoint = Endpoint.parse(self.opts.listen)
            except ValueError as err:
                raise UsageError(f"--listen: {err}") from None
        elif self.opts.listen_address or self.opts.listen_port:
            endpoint = Endpoint(
                host=self.opts.listen_address or LOOPBACK, port=self.opts.listen_port or 10809
            )
        else:
            endpoint = Endpoint(socket=str(self.workdir / f"{mapped.disk}.sock"))
        endpoint = self._secured(endpoint)
        if endpoint.socket and os.path.exists(endpoint.socket):
            raise TargetError(f"{endpoint.socket} exists: another server may be using it")
        qemu = _qemu_uid()  # --boot: QEMU connects to the socket
        server = NbdkitServer(
            [str(f.path) for f in mapped.files],
            export,
            endpoint,
            readonly=self.opts.readonly or self.opts.boot,
            threads=self.opts.threads,
            workdir=self.workdir,
            cache=self.opts.cache,
            blocksize=self.opts.blocksize,
            hexdump=self.opts.hexdump,
            allow_uids=(qemu,) if self.opts.boot and qemu is not None else (),
        )
        stack.callback(server.stop)
        server.start()
        if self.opts.boot and endpoint.socket:
            _give_to_qemu(Path(endpoint.socket))
        log.info(
            "disk %s: chain of %d file(s) open in %.2f s",
            mapped.disk,
            len(mapped.files),
            time.monotonic() - started,
        )
        mapped.server = server
        self._watched.append(server)

    def _secured(self, endpoint: Endpoint) -> Endpoint:
        """A TCP listener with TLS (--tls), or on loopback, or with the
        explicit --insecure: a backup is never served to the network unasked."""
        if endpoint.host is None:
            if self.opts.tls:
                raise UsageError(
                    "--tls protects a TCP listener (--listen HOST:PORT or -l/-p); unix sockets "
                    "are already only their owner's"
                )
            return endpoint
        if self.opts.tls:
            if not self.opts.listen:
                # nbdfuse and qemu-nbd --connect take no client certificate here.
                raise UsageError(
                    "--tls serves an export only (--listen HOST:PORT --tls); the block device "
                    "of -l/-p connects without TLS: use -l on loopback, or --listen with --tls"
                )
            check_server_certificates(self.opts.tls_cert)
            log.info("serving %s:%d with TLS, clients need a certificate of the CA in %s",
                     endpoint.host, endpoint.port, self.opts.tls_cert)  # fmt: skip
            return dataclasses.replace(endpoint, tls_dir=self.opts.tls_cert)
        if is_loopback(endpoint.host):
            log.info("serving %s:%d on loopback: every local user can connect (use unix:PATH "
                     "for an export only you can reach)", endpoint.host, endpoint.port)  # fmt: skip
            return endpoint
        if not self.opts.insecure:
            raise UsageError(
                f"{endpoint.host}:{endpoint.port} is not a loopback address: anyone who reaches "
                "it could read the backup. Give --tls (certificates in --tls-cert), or "
                "--insecure to serve it without authentication as virtnbdbackup 2.x did"
            )
        log.warning("serving %s:%d without TLS (--insecure): anyone who reaches it reads the "
                    "backup", endpoint.host, endpoint.port)  # fmt: skip
        return endpoint

    # block devices

    def _block_device(self, mapped: MappedDisk, stack: contextlib.ExitStack) -> str:
        assert mapped.server is not None and self.workdir is not None
        device = self.opts.device
        if device is None:
            device = "/dev/nbd0" if kernel_has_nbd() else "loop"
        block: KernelNbdDevice | FuseLoopDevice
        if device == "loop":
            block = FuseLoopDevice(
                mapped.server.uri, self.workdir / "fuse", readonly=self.opts.readonly
            )
        elif device.startswith("/dev/nbd"):
            block = KernelNbdDevice(device, mapped.server.uri, readonly=self.opts.readonly)
        else:
            raise UsageError(f"-d {device}: give /dev/nbdN or 'loop'")
        stack.callback(block.stop)
        block.start()
        assert block.device is not None
        self._watched.append(block)
        print(f"device {mapped.disk}: {block.device}", flush=True)
        for part in partitions(block.device):
            print(f"partition {mapped.disk}: {part}", flush=True)
        return block.device

    # --boot

    def _boot(self, disks: list[MappedDisk], stack: contextlib.ExitStack) -> str:
        folder = disks[0].files[0].path.parent
        config = latest_config(folder, [m.files for m in disks])
        if config is None:
            raise TargetError(f"{folder} holds no saved domain XML (vmconfig.*.xml) to boot")
        text = config.read_text()
        original = ET.fromstring(text).findtext("name") or "domain"
        name = self.opts.name or f"virtnbdmap_{original}"
        output = Path(
            self.opts.output or tempfile.mkdtemp(prefix=f"virtnbdmap.{original}.", dir=WORK_PARENT)
        )
        if not make_private_dir(output, TRAVERSE_DIR):
            os.chmod(output, os.stat(output).st_mode | 0o111)  # QEMU reaches the overlays
        images = {}
        for mapped in disks:
            overlay = output / f"{mapped.disk}.overlay.qcow2"
            if overlay.exists():
                raise TargetError(f"{overlay} exists; remove it or choose another -o folder")
            if mapped.server is not None:
                backing = mapped.server.uri
            else:
                backing = str(mapped.files[0].path.resolve())
            qemu.create_image(str(overlay), None, "qcow2", backing=backing, backing_fmt="raw")
            restrict(overlay)  # libvirt gives it to QEMU's user as the domain starts
            images[mapped.disk] = (str(overlay), "qcow2")
        boot = {}
        loader = (ET.fromstring(text).findtext("./os/loader") or "").strip()
        for path, saved in saved_boot_files(config).items():
            copy = output / os.path.basename(path)
            if not copy.exists():
                LOCAL.put(str(saved), str(copy), readable=path == loader)
            boot[path] = str(copy)
        xml = adjust_config(text, name=name, images=images, boot=boot)
        hypervisor = Hypervisor(self.opts.uri, self.opts.user, self.opts.password)
        stack.callback(hypervisor.close)
        domain = hypervisor.start_transient(xml)
        stack.callback(_stop_domain, domain, output)
        print(f"domain: {name} (overlays in {output})", flush=True)
        for disk, (image, _fmt) in images.items():
            print(f"overlay {disk}: {image}", flush=True)
        return name

    # waiting

    def _wait(self) -> None:
        while not self.cancel.wait(POLL_SECONDS):
            for part in self._watched:
                if not part.alive():
                    if isinstance(part, NbdkitServer):
                        raise NbdError(part.failure())
                    raise NbdError("nbdfuse ended unexpectedly; unmapping")


def _stop_domain(domain: Domain, output: Path) -> None:
    with contextlib.suppress(DomainError):
        domain.destroy()
    log.info(
        "the guest's writes are kept in %s/*.overlay.qcow2; to keep them, restore the "
        "backup (virtnbdrestore), then 'qemu-img rebase -u -F qcow2 -b RESTORED OVERLAY' "
        "and 'qemu-img commit OVERLAY'",
        output,
    )


def _qemu_uid() -> int | None:
    try:
        return pwd.getpwnam(QEMU_USER).pw_uid
    except KeyError:
        return None


def _give_to_qemu(socket: Path) -> None:
    """Let QEMU, running as the libvirt-qemu user, connect to the socket."""
    uid = _qemu_uid()
    if uid is not None:
        os.chown(socket, uid, -1)


SERVER_TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def check_server_certificates(folder: str) -> None:
    missing = [name for name in SERVER_TLS_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UsageError(
            f"--tls: {folder} lacks {', '.join(missing)}; nbdkit needs the CA certificate and "
            "a server certificate and key signed by it (give the folder with --tls-cert)"
        )


# The running instances, for --stop.


def _record_path(pid: int) -> Path:
    return RUN_DIR / f"{pid}.json"


def _register(record: dict[str, object]) -> None:
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    _record_path(os.getpid()).write_text(json.dumps(record))


def _unregister() -> None:
    _record_path(os.getpid()).unlink(missing_ok=True)


def running() -> list[dict[str, object]]:
    """Records of the virtnbdmap instances that still run."""
    found = []
    for path in sorted(RUN_DIR.glob("*.json")) if RUN_DIR.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _alive(pid):
            path.unlink(missing_ok=True)  # left by a killed instance
            continue
        found.append(record)
    return found


def stop_running(device: str | None = None, export: str | None = None, wait: float = 60) -> int:
    """Ask matching instances to unmap (SIGTERM) and wait for them; how many there were."""
    targets = []
    for record in running():
        exports = record.get("exports") or {}
        if device and record.get("device") != device:
            continue
        if export and export not in exports:  # type: ignore[operator]
            continue
        targets.append(int(record["pid"]))  # type: ignore[call-overload]
    for pid in targets:
        log.info("stopping virtnbdmap (pid %d)", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    for pid in targets:
        while _alive(pid):
            if time.monotonic() > deadline:
                raise VirtnbdError(f"virtnbdmap (pid {pid}) did not stop within {wait:.0f}s")
            time.sleep(0.1)
    return len(targets)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie has ended, it only waits for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
