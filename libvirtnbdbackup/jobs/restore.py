"""Restore, dump and verify backup sets."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..adapters import qemu
from ..adapters.domainxml import adjust_config
from ..adapters.hosts import LOCAL, Host
from ..adapters.nbdclient import NbdAddress, NbdClient
from ..adapters.virt import Domain, Hypervisor
from ..errors import Interrupted, NbdError, StreamError, TargetError, UsageError, VirtnbdError
from ..format.chainimage import merge_layers
from ..format.checked import Ledger, set_check
from ..format.index import Extent, FileIndex, build_index, load_index
from ..format.lz4piece import decompressed_slices
from ..format.reader import file_adler32, is_stream_file, read_meta_doc
from ..interrupts import Cancel
from ..targets.directory import PARTIAL_SUFFIX
from ..targets.lock import FolderLock
from ..targets.private import TRAVERSE_DIR
from ..targets.writeback import WriteBehind
from .backupset import (
    DataFile,
    chains,
    config_ident,
    image_names,
    inside,
    latest_config,
    load_json,
    ordered_sequence,
    saved_boot_files,
    scan,
)
from .guestfiles import autostart_file, restore_tpm_state, tpm_file
from .remote import Remote, RemoteOptions

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # bytes read from a data file, or decompressed, at once
# Compressed files are written by this many threads, each with its own
# connection and pieces: lz4 releases the GIL, and the writes of a plan
# never overlap, so their order does not matter.
DECOMPRESS_WORKERS = max(1, min(4, os.cpu_count() or 2))


@dataclass
class RestoreOptions:
    input: str
    output: str
    disk: str | None = None
    raw: bool = False
    progress: bool = True
    adjust_config: bool = False  # -c: make the domain XML run from the restored images
    define: bool = False  # -D: define the adjusted domain in libvirt
    name: str | None = None  # -N: name of the restored domain
    preallocate: bool = False
    compress: bool = False  # compressed qcow2 clusters, through an uncompressed working copy
    uri: str = "qemu:///system"
    user: str | None = None
    password: str | None = None
    until: str | None = None  # restore the state of this checkpoint
    sequence: list[str] | None = None  # explicit data file names, base first
    socket_file: str | None = None  # -f: qemu-nbd's unix socket (default: a private one)
    config_file: str = "vmconfig.xml"  # -C: name of the domain XML written next to the images
    remote: RemoteOptions = field(default_factory=RemoteOptions)


class RestoreJob:
    def __init__(self, opts: RestoreOptions, cancel: Cancel) -> None:
        self.opts = opts
        self.cancel = cancel
        self.input = Path(opts.input)
        self.remote = Remote(opts.uri, opts.remote)
        self.host: Host = LOCAL
        if self.remote.is_remote:
            if not os.path.isabs(opts.output):
                raise UsageError(
                    f"-o {opts.output}: a restore to {self.remote.uri.host} needs an absolute "
                    "folder on that host"
                )
            self.output = os.path.normpath(opts.output)
        else:
            self.output = str(Path(opts.output).resolve())

    def run(self) -> list[Path]:
        try:
            return self._run()
        finally:
            self.host.close()

    def _run(self) -> list[Path]:
        self.check = set_check(self.input)
        files = scan(self.input, self.check)
        if self.opts.disk:
            files = [f for f in files if f.disk == self.opts.disk]
        if not files:
            which = f" for disk {self.opts.disk}" if self.opts.disk else ""
            raise TargetError(f"{self.input} holds no data files{which}")
        partials = sorted(self.input.glob(f"*.data{PARTIAL_SUFFIX}"))
        if partials:
            log.warning(
                "ignoring unfinished data files of a failed backup: %s",
                ", ".join(p.name for p in partials),
            )
        disk_chains = self._sequences(files)
        config = latest_config(self.input, list(disk_chains.values()))
        # --sequence restores the one disk it names, as 2.x does: the image is
        # named after the disk (e.g. sda), not after the source image.
        names = (
            {disk: disk for disk in disk_chains}
            if self.opts.sequence
            else image_names(config, list(disk_chains))
        )
        # -D needs libvirt: fail before any image is written, not after.
        hypervisor = (
            Hypervisor(self.opts.uri, self.opts.user, self.opts.password)
            if self.opts.define
            else None
        )
        try:
            return self._restore(disk_chains, config, names, hypervisor)
        finally:
            if hypervisor is not None:
                hypervisor.close()

    def _restore(
        self,
        disk_chains: dict[str, list[DataFile]],
        config: Path | None,
        names: dict[str, str],
        hypervisor: Hypervisor | None,
    ) -> list[Path]:
        if self.remote.is_remote:
            self.host = self.remote.host()
            log.info("restoring to %s on %s", self.output, self.host.name)
            log.info("%s", self.remote.describe_transport())
        # QEMU's user must reach the images once libvirt gives them to it (-D).
        self.host.makedirs(self.output, TRAVERSE_DIR)
        log.info(
            "restored images and files are created 0600 (a new folder 0711): libvirt gives the "
            "images to QEMU's user as the domain starts (2.47 left them to the umask)"
        )
        if self.host.is_remote:
            # flock cannot reach a folder on another host; restores there are
            # kept apart by their distinct NBD ports only.
            return self._restore_locked(disk_chains, config, names, hypervisor)
        with FolderLock(self.output, f"virtnbdrestore of {self.input}"):
            return self._restore_locked(disk_chains, config, names, hypervisor)

    def _restore_locked(
        self,
        disk_chains: dict[str, list[DataFile]],
        config: Path | None,
        names: dict[str, str],
        hypervisor: Hypervisor | None,
    ) -> list[Path]:
        restored: dict[str, tuple[str, str]] = {}
        for position, (disk, chain) in enumerate(disk_chains.items()):
            image = os.path.join(self.output, names[disk])
            if chain[0].meta is None:
                if not self.opts.raw:
                    log.info("skipping raw image %s of disk %s: use --raw", chain[0].name, disk)
                    continue
                self._restore_raw(chain[0], image)
                restored[disk] = (image, "raw")
            else:
                self._restore_stream(disk, chain, image, position)
                restored[disk] = (image, "qcow2")
        if config is not None:
            self._restore_config(config, restored, hypervisor)
        elif hypervisor is not None:
            raise TargetError(f"{self.input} holds no domain XML (vmconfig.*.xml) to define")
        return [Path(path) for path, _fmt in restored.values()]

    def _restore_config(
        self,
        config: Path,
        images: dict[str, tuple[str, str]],
        hypervisor: Hypervisor | None,
    ) -> None:
        """Copy the domain XML (adjusted with -c) and the boot files saved with it."""
        text = config.read_text()
        boot = {}
        loader = ET.fromstring(text).findtext("./os/loader")
        for path, saved in saved_boot_files(config).items():
            dest = os.path.join(self.output, os.path.basename(path))
            if not self.host.exists(dest):
                self.host.put(str(saved), dest, readable=path == (loader or "").strip())
            boot[path] = dest
            log.info("restored boot file %s", dest)
        target = os.path.join(self.output, self.opts.config_file)
        if not (self.opts.adjust_config or self.opts.define):
            self.host.write_bytes(target, text.encode())
            log.info("copied domain configuration %s to %s", config.name, target)
            return
        original = ET.fromstring(text).findtext("name") or "domain"
        name = self.opts.name or f"restore_{original}"
        adjusted = adjust_config(text, name=name, images=images, boot=boot)
        self.host.write_bytes(target, adjusted.encode())
        log.info("adjusted domain configuration written to %s", target)
        if hypervisor is not None:
            hypervisor.define(adjusted)
            log.info("defined domain %s", name)
            self._restore_domain_files(config, hypervisor.domain(name))
        else:
            log.info("define it with: virsh define %s", target)

    def _restore_domain_files(self, config: Path, domain: Domain) -> None:
        """-D: the autostart flag and the swtpm state saved with the backup."""
        ident = config_ident(config)
        if (config.parent / autostart_file(ident)).is_file():
            domain.set_autostart()
            log.info("domain %s marked for autostart, as the backed-up domain was", domain.name)
        archive = config.parent / tpm_file(ident)
        if not archive.is_file():
            return
        if self.host.is_remote:
            log.warning("TPM state %s not restored: the domain is on another host", archive.name)
            return
        try:
            dest = restore_tpm_state(inside(config.parent, archive), domain.uuid())
        except (OSError, ValueError, tarfile.TarError) as err:
            raise TargetError(f"cannot restore the TPM state {archive}: {err}") from None
        log.info("restored the TPM state %s into %s", archive.name, dest)

    def _sequences(self, files: list[DataFile]) -> dict[str, list[DataFile]]:
        """Per disk, the files to apply in order."""
        if self.opts.sequence:
            by_name = {f.name: f for f in files}
            missing = [n for n in self.opts.sequence if n not in by_name]
            if missing:
                raise TargetError(f"--sequence: no data file {', '.join(missing)} in {self.input}")
            chosen = ordered_sequence([by_name[n] for n in self.opts.sequence])
            return {chosen[0].disk: chosen}
        result = {}
        for disk, chain in chains(files).items():
            result[disk] = chain.sequence(self.opts.until)
            log.info("disk %s: applying %s", disk, " + ".join(f.name for f in result[disk]))
        return result

    def _restore_raw(self, source: DataFile, image: str) -> None:
        partial = self._claim(image)
        try:
            if self.host.is_remote:
                size = source.path.stat().st_size
                qemu.create_image(partial, size, "raw", host=self.host)
                self.host.restrict(partial)
                with self._serve(partial, "raw") as address:
                    qemu.convert_raw_to_nbd(str(source.path), address)
            else:
                qemu.convert_raw(str(source.path), partial)
            self.host.commit(partial, image)
        except BaseException:
            with self.cancel.scope():
                self.cancel.defer()
                self._discard(partial)
            raise
        log.info("disk %s: copied raw image to %s", source.disk, image)

    def _serve(
        self, image: str, fmt: str, connections: int = 1
    ) -> AbstractContextManager[NbdAddress]:
        """qemu-nbd for an image being restored: a unix socket here; on a
        remote host one forwarded over SSH, or TCP (-P, -I, --tls)."""
        remote = self.remote.over_tcp
        return qemu.nbd_server(
            image,
            fmt,
            connections=connections,
            host=self.host,
            socket=None if remote else self.opts.socket_file,
            tcp=self.remote.nbd_address() if remote else None,
            bind=self.remote.bind_address() if remote else None,
        )

    def _claim(self, image: str) -> str:
        """The ``.partial`` path to build ``image`` in; never replace an image."""
        if self.host.exists(image):
            raise TargetError(f"{image} exists already; remove it or restore to another folder")
        partial = image + PARTIAL_SUFFIX
        if self.host.exists(partial):
            # The folder is locked: no other restore is writing it.
            log.warning("removing %s, left by an interrupted restore", partial)
            self.host.remove(partial)
        return partial

    def _discard(self, partial: str) -> None:
        try:
            self.host.remove(partial)
        except (OSError, VirtnbdError) as err:
            log.warning("cannot remove %s: %s", partial, err)

    def _restore_stream(self, disk: str, chain: list[DataFile], image: str, position: int) -> None:
        base = chain[0]
        assert base.meta is not None
        options: list[str] = []
        info = load_json(self.input / f"{disk}.{base.ident}.qcow.json")
        if isinstance(info, dict):
            options = qemu.qcow2_create_options(info)
        else:
            log.warning("disk %s: no image information saved; using qemu-img defaults", disk)
        if self.opts.preallocate:
            options.append("preallocation=metadata")
        plan = self._plan(chain, base.meta.virtual_size)
        partial = self._claim(image)
        # QEMU writes a compressed cluster only once, but a chain overwrites clusters:
        # replay into a plain working copy, then let qemu-img compress it.
        work = image + ".uncompressed" + PARTIAL_SUFFIX
        replay_into = work if self.opts.compress else partial
        started = time.monotonic()
        total = sum(end - start for writes in plan for _extent, start, end in writes)
        workers = DECOMPRESS_WORKERS if any(f.meta and f.meta.is_compressed for f in chain) else 1
        log.info("disk %s: writing %d bytes of data", disk, total)
        try:
            qemu.create_image(replay_into, base.meta.virtual_size, "qcow2", options, self.host)
            self.host.restrict(replay_into)  # before any data is written into it
            with (
                self._serve(replay_into, "qcow2", workers) as address,
                self._write_behind(replay_into) as behind,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=disk,
                    position=position,
                    disable=not self.opts.progress,
                ) as bar,
                contextlib.ExitStack() as connections,
            ):
                clients = []
                for _ in range(workers):
                    client = NbdClient.connect(address, wait=10)
                    connections.callback(client.close)
                    clients.append(client)
                for data_file, writes in zip(chain, plan, strict=True):
                    log.info("disk %s: applying %s", disk, data_file.name)
                    assert data_file.meta is not None
                    ledger = self._ledger(data_file)
                    with FileSource(data_file.path, data_file.meta.is_compressed, ledger) as source:
                        self._replay(source, writes, clients, bar, behind)
                        source.verify()
                for client in clients:
                    client.flush()
            if self.opts.compress:
                log.info("disk %s: compressing the restored image", disk)
                qemu.convert_compressed(work, partial, options, self.host)
                self.host.restrict(partial)
            self.host.commit(partial, image)
        except BaseException as err:
            with self.cancel.scope():
                self.cancel.defer()
                self._discard(partial)
            if isinstance(err, NbdError) and os.strerror(errno.ENOSPC) in str(err):
                # qemu-nbd's write failed on the image file: say which file.
                raise TargetError(
                    f"cannot write {replay_into}: {os.strerror(errno.ENOSPC)} (the restore "
                    "target is full: free space or restore to another folder)"
                ) from None
            raise
        finally:
            if self.opts.compress:
                self._discard(work)
        seconds = time.monotonic() - started
        log.info(
            "disk %s: restored %s (%.1f MiB of data in %.2f s, %.1f MiB/s)",
            disk,
            image,
            total / 2**20,
            seconds,
            total / 2**20 / max(seconds, 1e-6),
        )

    def _ledger(self, data_file: DataFile) -> Ledger | None:
        """The checksum check of a file while it is applied; None when it has no
        checksum at all (an unzipped ``-o -`` backup of 2.x)."""
        expected = self.check.expected(data_file.path)
        if not expected.checked:
            log.warning(
                "%s has no checksum (.chksum or manifest): its data is not checked", data_file.name
            )
            return None
        return Ledger(data_file.path, expected)

    def _write_behind(self, image: str) -> AbstractContextManager[WriteBehind | None]:
        """Start the writeback of a local image while qemu-nbd fills it: qcow2
        flushes between metadata updates, and each flush would otherwise wait
        for all the data written so far (restores 30% faster, measured)."""
        if self.host.is_remote:
            return contextlib.nullcontext()
        return WriteBehind.watch(image)

    def _replay(
        self,
        source: FileSource,
        writes: list[Write],
        clients: list[NbdClient],
        bar: tqdm,
        behind: WriteBehind | None,
    ) -> None:
        """Write the planned parts of one file, over all ``clients`` at once."""
        units = source.units(writes)
        lock = threading.Lock()
        failed = threading.Event()

        def stream() -> Iterator[tuple[int, memoryview]]:
            while not failed.is_set():
                with lock:
                    unit = next(units, None)
                if unit is None:
                    return
                for offset, chunk in source.unit_chunks(unit):
                    if self.cancel.is_set():
                        raise Interrupted("restore interrupted")
                    yield offset, chunk
                    with lock:
                        bar.update(len(chunk))
                    if behind is not None:
                        behind.wrote(len(chunk))

        def write(client: NbdClient) -> None:
            try:
                client.write(stream())
            except BaseException:
                failed.set()
                raise

        if len(clients) == 1:
            write(clients[0])
            return
        with ThreadPoolExecutor(len(clients), thread_name_prefix="restore") as pool:
            futures = [pool.submit(write, client) for client in clients]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                future.result()

    @staticmethod
    def _plan(chain: list[DataFile], size: int) -> list[list[Write]]:
        """Index each file of the chain (side file, or its frame headers) and plan the writes."""
        indexes = []
        for data_file in chain:
            path = str(data_file.path)
            with open(path, "rb") as fh:
                index = load_index(path, fh) or build_index(fh, path)
            if index.virtual_size != size:
                raise StreamError(
                    f"{path}: disk size {index.virtual_size} differs from the full backup's {size}"
                )
            indexes.append(index)
        return plan_writes(indexes, size)


Write = tuple[Extent, int, int]  # a data extent and the part [start, end) of it to write


def plan_writes(indexes: list[FileIndex], size: int) -> list[list[Write]]:
    """Per file of the chain (oldest first), the parts of its data extents
    that hold the newest bytes of the disk, in disk order.

    Only the newest file covering a byte writes it: data a later file
    overwrites is never read nor written, and no two writes overlap. On the
    fresh image nothing else is needed: where the newest frame is a zero
    frame, or no file has data, the image reads as zeros already.
    """
    writes: list[list[Write]] = [[] for _ in indexes]
    for segment in merge_layers(indexes, size):
        if segment.extent is not None:
            writes[segment.layer].append((segment.extent, segment.start, segment.end))
    return writes


@dataclass(frozen=True)
class Piece:
    """One LZ4 frame of a compressed extent."""

    start: int  # disk offset of its first byte
    length: int  # bytes it holds on the disk
    position: int  # file offset of its stored bytes
    stored: int  # stored byte count


Unit = Write | tuple[Piece, list[tuple[int, int]]]


class FileSource:
    """The bytes a restore plan takes from one data file.

    The plan is cut into units that can be written in any order, by any
    thread: the parts of one extent (uncompressed), or of one LZ4 frame
    (compressed), which is decompressed a slice at a time as it is written.
    """

    def __init__(self, path: Path, compressed: bool, ledger: Ledger | None = None) -> None:
        """``ledger``: sums every byte read, for ``verify()`` (format/checked.py)."""
        self.path = path
        self.compressed = compressed
        self.ledger = ledger
        self._fd = os.open(path, os.O_RDONLY)
        self._buffers = threading.local()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self._fd)

    def verify(self) -> None:
        """The file's checksum, from what was read and what was not."""
        if self.ledger is not None:
            self.ledger.verify(self._fd)

    def units(self, writes: list[Write]) -> Iterator[Unit]:
        if self.compressed:
            return self._pieces(writes)
        return iter(writes)

    def unit_chunks(self, unit: Unit) -> Iterator[tuple[int, memoryview]]:
        """``(disk offset, data)`` of one unit; each view is valid until the
        next is asked for."""
        if isinstance(unit[0], Piece):
            piece, parts = unit
            yield from self._decompressed(piece, parts)
            return
        extent, start, end = unit
        view = self._buffer()
        for offset in range(start, end, CHUNK):
            n = min(CHUNK, end - offset)
            position = extent.offset + offset - extent.start
            got = os.preadv(self._fd, [view[:n]], position)
            if got != n:
                raise StreamError(
                    f"{self.path} at offset {position + got}: file ends inside the "
                    f"extent at {extent.start} (the file is truncated)"
                )
            if self.ledger is not None:
                self.ledger.add(position, view[:n])
            yield offset, view[:n]

    def _buffer(self) -> memoryview:
        """This thread's read buffer."""
        buffer = getattr(self._buffers, "view", None)
        if buffer is None:
            buffer = self._buffers.view = memoryview(bytearray(CHUNK))
        return buffer

    @staticmethod
    def _pieces(writes: list[Write]) -> Iterator[tuple[Piece, list[tuple[int, int]]]]:
        """Each piece the writes need once, with the parts of it they take."""
        current: Piece | None = None
        parts: list[tuple[int, int]] = []
        for extent, start, end in writes:
            disk, position = extent.start, extent.offset
            for stored, length in extent.pieces:
                if start < disk + length and end > disk:
                    piece = Piece(disk, length, position, stored)
                    if current is not None and piece != current:
                        yield current, parts
                        parts = []
                    current = piece
                    parts.append((max(start, disk), min(end, disk + length)))
                disk += length
                position += stored
        if current is not None:
            yield current, parts

    def _decompressed(
        self, piece: Piece, parts: list[tuple[int, int]]
    ) -> Iterator[tuple[int, memoryview]]:
        """The planned parts of one LZ4 frame, decompressed ``CHUNK`` bytes at a time."""
        where = f"{self.path} at offset {piece.position}"
        disk = piece.start
        # With a ledger, every stored byte goes into the file's Adler-32,
        # checked before the image is committed: the frame's own xxHash
        # would check the same bytes again (a sixth of the restore's time).
        for raw in decompressed_slices(
            self._fd,
            piece.position,
            piece.stored,
            piece.length,
            where,
            CHUNK,
            self.ledger,
            check=self.ledger is None,
        ):
            yield from _clip(disk, raw, parts)
            disk += len(raw)


def _clip(
    start: int, data: memoryview, parts: list[tuple[int, int]]
) -> Iterator[tuple[int, memoryview]]:
    """The bytes of ``data`` (at disk offset ``start``) that fall into ``parts``."""
    end = start + len(data)
    for a, b in parts:
        if a < end and b > start:
            yield max(a, start), data[max(a, start) - start : min(b, end) - start]


def dump(
    folder: str,
    disk: str | None = None,
    sequence: list[str] | None = None,
    detail: bool = False,
) -> list[Any]:
    """What ``-o dump`` prints: the meta JSON of each data file, keys as
    stored, in 2.x's order (the files by modification time, or the
    ``--sequence`` order), raw images left out. ``detail`` adds each
    file's name and lists raw images too."""
    root = Path(folder)
    if not root.is_dir():
        raise TargetError(f"{root} is not a backup folder")
    if sequence:
        paths = [root / name for name in sequence]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise TargetError(f"--sequence: no data file {', '.join(missing)} in {root}")
    else:
        paths = sorted(root.glob("*.data"), key=lambda p: (p.stat().st_mtime, p.name))
    out: list[Any] = []
    for path in paths:
        if disk is not None and not path.name.startswith(disk):
            continue
        if not is_stream_file(str(path)):
            if detail:
                out.append({"file": path.name, "diskName": path.name.split(".", 1)[0], "raw": True})
            else:
                log.info("%s: a raw image, no meta to dump", path.name)
            continue
        doc = read_meta_doc(str(path))
        out.append({"file": path.name, **doc} if detail else doc)
    return out


def verify(folder: str, disk: str | None = None, buffsize: int = 4 * 1024 * 1024) -> None:
    """Recompute each data file's checksum and compare it with the saved one.

    A file without a ``.chksum`` (an unzipped ``-o -`` backup has none) is a
    warning, not an error, as in 2.x: ``--strict`` turns it into exit 2.
    """
    failed = []
    checked = 0
    check = set_check(folder)
    for f in scan(folder, check):
        if f.meta is None or (disk is not None and f.disk != disk):
            continue
        wanted = check.expected(f.path)
        if wanted.adler32 is None:
            log.warning("%s: no checksum file, not verified", f.name)
            continue
        expected = wanted.adler32
        actual = file_adler32(str(f.path), chunk_size=buffsize)
        checked += 1
        if actual == expected:
            log.info("%s: checksum %d OK", f.name, actual)
        else:
            log.error("%s: checksum %d does not match the saved %d", f.name, actual, expected)
            failed.append(f.name)
    if failed:
        raise StreamError(
            f"{len(failed)} of {checked} data files failed verification: " + ", ".join(failed)
        )
    if not checked:
        log.warning("%s holds no data file with a checksum: nothing was verified", folder)


def dump_json(
    folder: str,
    disk: str | None = None,
    sequence: list[str] | None = None,
    detail: bool = False,
) -> str:
    return json.dumps(dump(folder, disk, sequence, detail), indent=4)
