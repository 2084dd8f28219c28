"""NBD client on libnbd: extent queries and pipelined reads and writes.

Reads and writes keep several requests in flight on one connection
(libnbd's aio calls) with buffers shared with Python (no copies), so the
link stays busy while Python writes or compresses the previous chunk.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import nbd

from ..errors import NbdError

ALLOCATION_CONTEXT = "base:allocation"


def bitmap_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


STATE_HOLE = 1  # NBD_STATE_HOLE in base:allocation
DIRTY = 1  # set in qemu:dirty-bitmap:NAME for blocks changed since the checkpoint
# QEMU serves 512 KiB reads faster than 1 MiB ones (10 to 15% over a whole
# backup, measured; 256 KiB costs more in Python than it saves).
READ_CHUNK = 512 * 1024
READ_DEPTH = 32
WRITE_CHUNK = 512 * 1024
WRITE_DEPTH = 16
# Large enough for a whole write request: qemu-nbd then takes each payload
# in one read, not in portions of the default 208 KiB (restores 15 to 20%
# faster, measured). Root may exceed net.core.wmem_max (SO_SNDBUFFORCE).
SEND_BUFFER = 4 * 1024 * 1024
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
MAX_BLOCK_STATUS = 1 << 31  # bytes asked per block status request
DEFAULT_PORT = 10809

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    flags: int


@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD server listens: a unix socket, or TCP (with TLS when
    ``tls_dir`` names the folder of the client certificates)."""

    socket: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    tls_dir: str | None = None

    def uri(self, export: str = "") -> str:
        if self.socket:
            return f"nbd+unix:///{quote(export)}?socket={quote(self.socket)}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        scheme = "nbds" if self.tls_dir else "nbd"
        return f"{scheme}://{host}:{self.port}/{quote(export)}"

    def __str__(self) -> str:
        if self.socket:
            return self.socket
        return f"{self.host}:{self.port}{' (TLS)' if self.tls_dir else ''}"


def _is_tls_failure(message: str) -> bool:
    """A refused certificate, ours or the server's: retrying cannot help."""
    return any(word in message for word in ("certificate", "gnutls", "TLS"))


class BufferPool:
    """Reused I/O buffers, shared by all connections of the process.

    The python bindings of libnbd 1.14 never release the buffer export that
    aio_pread/aio_pwrite take, so a buffer passed to them once is never
    freed: a new buffer per request grows the process by the whole disk.
    Buffers from this pool are passed again and again instead; the pool
    grows only to the most requests in flight at once.
    """

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    def get(self, size: int) -> memoryview:
        with self._lock:
            free = self._free.get(size)
            buf = free.pop() if free else bytearray(size)
        return memoryview(buf)

    def put(self, view: memoryview) -> None:
        buf = view.obj
        assert isinstance(buf, bytearray)
        with self._lock:
            self._free.setdefault(len(buf), []).append(buf)


BUFFERS = BufferPool()


def _shared(view: memoryview) -> nbd.Buffer:
    """An aio buffer over ``view``, without a copy."""
    return nbd.Buffer.from_buffer(view)


def _widen_send_buffer(handle: nbd.NBD) -> None:
    sock = socket.socket(fileno=os.dup(handle.aio_get_fd()))
    try:
        for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
                return
            except OSError:
                continue
    finally:
        sock.close()


def _error(what: str, err: Exception) -> NbdError:
    return NbdError(f"{what}: {getattr(err, 'string', None) or err}")


class NbdClient:
    def __init__(self, handle: nbd.NBD, where: str) -> None:
        self._h = handle
        self.where = where
        self.size: int = handle.get_size()
        maximum = handle.get_block_size(nbd.SIZE_MAXIMUM) or 32 * 1024 * 1024
        self.max_request: int = min(maximum, 32 * 1024 * 1024)

    @classmethod
    def connect(
        cls,
        address: NbdAddress,
        export: str = "",
        contexts: Iterable[str] = (),
        *,
        wait: float = 0.0,
    ) -> NbdClient:
        """Connect, retrying for up to ``wait`` seconds while the server starts.

        With ``address.tls_dir`` the connection is TLS or nothing: a server
        that does not offer TLS, or a certificate that does not verify,
        fails the connection.
        """
        uri = address.uri(export)
        deadline = time.monotonic() + wait
        while True:
            handle = nbd.NBD()
            for context in contexts:
                handle.add_meta_context(context)
            if address.tls_dir:
                handle.set_tls_certificates(address.tls_dir)
            try:
                handle.connect_uri(uri)
                if address.tls_dir and not handle.get_tls_negotiated():
                    raise NbdError(f"{uri}: the server did not negotiate TLS")
                _widen_send_buffer(handle)
                return cls(handle, uri)
            except nbd.Error as err:
                if address.tls_dir and _is_tls_failure(err.string or ""):
                    raise _error(
                        f"cannot connect to NBD export {export!r} at {address}: TLS "
                        f"certificate check failed (the certificates in {address.tls_dir} and "
                        "the hypervisor's must be signed by one CA, and the server certificate "
                        f"must name {address.host})",
                        err,
                    ) from None
                if time.monotonic() >= deadline:
                    raise _error(
                        f"cannot connect to NBD export {export!r} at {address}", err
                    ) from None
                time.sleep(0.05)

    def can_meta_context(self, context: str) -> bool:
        return bool(self._h.can_meta_context(context))

    def extents(self, context: str = ALLOCATION_CONTEXT) -> list[Extent]:
        """Block status of the whole export for ``context``, in order."""
        result: list[Extent] = []
        pos = 0

        def collect(ctx: str, offset: int, entries: list[int], _err: Any) -> int:
            nonlocal pos
            if ctx != context:
                return 0
            for i in range(0, len(entries) - 1, 2):
                length = min(entries[i], self.size - pos)
                if length <= 0:
                    break
                result.append(Extent(pos, length, entries[i + 1]))
                pos += length
            return 0

        while pos < self.size:
            before = pos
            try:
                self._h.block_status(min(self.size - pos, MAX_BLOCK_STATUS), pos, collect)
            except nbd.Error as err:
                raise _error(f"{self.where}: block status at offset {pos} failed", err) from None
            if pos == before:
                raise NbdError(f"{self.where}: server sent no extents for offset {pos}")
        return result

    def read(
        self,
        ranges: Iterable[tuple[int, int]],
        chunk: int = READ_CHUNK,
        depth: int = READ_DEPTH,
    ) -> Generator[tuple[int, memoryview], None, None]:
        """Read ``(offset, length)`` ranges, yielding ``(offset, data)`` in order.

        ``depth`` reads stay in flight, into reused buffers: a yielded view
        is valid only until the next one is asked for (copy what must
        outlive it). Memory use does not grow with the disk.
        """
        with contextlib.closing(self.read_buffers(ranges, chunk, depth)) as reads:
            for at, view in reads:
                try:
                    yield at, view
                finally:
                    BUFFERS.put(view)

    def read_buffers(
        self,
        ranges: Iterable[tuple[int, int]],
        chunk: int = READ_CHUNK,
        depth: int = READ_DEPTH,
    ) -> Generator[tuple[int, memoryview], None, None]:
        """As ``read``, but each yielded view is the caller's: it stays valid
        until the caller hands it back with ``BUFFERS.put`` (which it must,
        or the pool grows by a buffer)."""
        chunk = min(chunk, self.max_request)
        pending: deque[tuple[int, int, memoryview]] = deque()
        try:
            for start, length in ranges:
                for offset in range(start, start + length, chunk):
                    if len(pending) >= depth:
                        cookie, at, view = pending.popleft()
                        self._wait(cookie, f"read at offset {at}")
                        yield at, view
                    view = BUFFERS.get(chunk)[: min(chunk, start + length - offset)]
                    try:
                        cookie = self._h.aio_pread(_shared(view), offset)
                    except nbd.Error as err:
                        BUFFERS.put(view)
                        raise _error(f"{self.where}: read at offset {offset} failed", err) from None
                    pending.append((cookie, offset, view))
            while pending:
                cookie, at, view = pending.popleft()
                self._wait(cookie, f"read at offset {at}")
                yield at, view
        finally:
            self._settle(pending)

    def write(self, chunks: Iterable[tuple[int, Buffer]], depth: int = WRITE_DEPTH) -> None:
        """Write ``(offset, data)`` chunks, keeping up to ``depth`` requests in flight.

        Data is copied into reused buffers of ``WRITE_CHUNK`` bytes, so the
        caller may reuse its own at once.
        """
        size = min(WRITE_CHUNK, self.max_request)
        pending: deque[tuple[int, int, memoryview]] = deque()
        try:
            for offset, data in chunks:
                source = memoryview(data)
                for pos in range(0, len(source), size):
                    piece = source[pos : pos + size]
                    if len(pending) >= depth:
                        cookie, at, done = pending.popleft()
                        self._wait(cookie, f"write at offset {at}")
                        BUFFERS.put(done)
                    view = BUFFERS.get(size)[: len(piece)]
                    view[:] = piece
                    try:
                        cookie = self._h.aio_pwrite(_shared(view), offset + pos)
                    except nbd.Error as err:
                        BUFFERS.put(view)
                        raise _error(
                            f"{self.where}: write at offset {offset + pos} failed", err
                        ) from None
                    pending.append((cookie, offset + pos, view))
            while pending:
                cookie, at, done = pending.popleft()
                self._wait(cookie, f"write at offset {at}")
                BUFFERS.put(done)
        finally:
            self._settle(pending)

    def _settle(self, pending: deque[tuple[int, int, memoryview]]) -> None:
        """After an error: let requests in flight end before their buffers are reused."""
        while pending:
            cookie, _at, view = pending.popleft()
            # Ended, in error too, or the connection is gone: either way no
            # more data comes into the buffer.
            with contextlib.suppress(NbdError):
                self._wait(cookie, "request")
            BUFFERS.put(view)

    def zero(self, offset: int, length: int) -> None:
        pos = offset
        while pos < offset + length:
            n = min(offset + length - pos, 1 << 30)
            try:
                self._h.zero(n, pos)
            except nbd.Error as err:
                raise _error(f"{self.where}: zeroing at offset {pos} failed", err) from None
            pos += n

    def flush(self) -> None:
        try:
            self._h.flush()
        except nbd.Error as err:
            raise _error(f"{self.where}: flush failed", err) from None

    def close(self) -> None:
        """Disconnect; the handle is freed with this object."""
        with contextlib.suppress(nbd.Error):
            self._h.shutdown()

    def _wait(self, cookie: int, what: str) -> None:
        try:
            while not self._h.aio_command_completed(cookie):
                if self._h.aio_is_closed() or self._h.aio_is_dead():
                    # Disconnected (by close(), or the server went away):
                    # no reply can come any more.
                    raise NbdError(f"{self.where}: {what} failed: the connection is closed")
                self._h.poll(-1)
        except nbd.Error as err:
            raise _error(f"{self.where}: {what} failed", err) from None
