"""Read and compress one disk on several threads ("lanes"), in file order.

Each lane reads its task's pieces over an NBD connection of its own and
compresses them as the bytes arrive (lz4 releases the GIL), so no piece is
ever held uncompressed. The writer takes the pieces in file order: the
oldest task's parts as its lane makes them, while the other lanes run
ahead and keep theirs. Memory thus holds at most ``lanes - 1`` tasks of
compressed bytes, whatever the size of the disk.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from ..adapters.nbdclient import NbdClient
from ..errors import Interrupted, NbdError
from ..format.writer import PieceCompressor, piece_lengths

READ_DEPTH = 8  # reads in flight per lane
# Raw bytes one task reads: one piece of the largest size, or many small
# ones whose reads then share one pipeline.
TASK_BYTES = 32 * 1024 * 1024

Piece = tuple[int, int]  # (disk offset, length)
# In a lane's queue: compressed parts; b"" ends a piece (lz4 hands out no
# empty part), None tells that the lane failed.
Part = bytes | None


def compression_tasks(data: list[Piece], max_piece: int) -> list[list[Piece]]:
    """The LZ4 pieces of the data regions ``(offset, length)``, in disk
    order, grouped into tasks of up to ``TASK_BYTES``."""
    tasks: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for offset, region_length in data:
        for length in piece_lengths(region_length, max_piece):
            if current and size + length > TASK_BYTES:
                tasks.append(current)
                current, size = [], 0
            current.append((offset, length))
            size += length
            offset += length
    if current:
        tasks.append(current)
    return tasks


@dataclass
class _Running:
    future: Future[None]
    parts: queue.SimpleQueue[Part]
    pieces_left: int


class CompressionLanes:
    """Hands out the compressed pieces of ``data`` in order (``next_piece``).

    ``connect`` opens a connection to the disk's export; ``progress`` is
    told of every chunk read. Leaving the block stops the lanes.
    """

    def __init__(
        self,
        connect: Callable[[], NbdClient],
        data: list[Piece],
        *,
        max_piece: int,
        level: int,
        lanes: int,
        progress: Callable[[int], None],
        cancel: threading.Event,
        disk: str,
    ) -> None:
        self._connect = connect
        self._todo = iter(compression_tasks(data, max_piece))
        self._level = level
        self._progress = progress
        self._cancel = cancel
        self._stop = threading.Event()
        self._disk = disk
        self._lane = threading.local()
        self._clients: list[NbdClient] = []
        self._clients_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(lanes, thread_name_prefix=f"lz4-{disk}")
        self._running: deque[_Running] = deque()
        for _ in range(lanes):
            self._start_next()

    def __enter__(self) -> CompressionLanes:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for running in self._running:
            running.future.cancel()
        wait([r.future for r in self._running])
        self._pool.shutdown(wait=True)
        for client in self._clients:
            client.close()

    def next_piece(self) -> Iterator[bytes]:
        """The compressed parts of the next piece, as its lane makes them."""
        if not self._running:
            raise NbdError(f"disk {self._disk}: no piece left to compress")
        running = self._running[0]
        while part := running.parts.get():
            yield part
        if part is None:
            running.future.result()  # raises the lane's error
        running.pieces_left -= 1
        if not running.pieces_left:
            self._running.popleft().future.result()
            self._start_next()

    def _start_next(self) -> None:
        task = next(self._todo, None)
        if task is None:
            return
        parts: queue.SimpleQueue[Part] = queue.SimpleQueue()
        future = self._pool.submit(self._run, task, parts)
        self._running.append(_Running(future, parts, len(task)))

    def _run(self, task: list[Piece], parts: queue.SimpleQueue[Part]) -> None:
        try:
            self._compress(task, parts)
        except BaseException:
            parts.put(None)
            raise

    def _compress(self, task: list[Piece], parts: queue.SimpleQueue[Part]) -> None:
        # Closed here, on every way out: its reads in flight end while the
        # connection is still open.
        with contextlib.closing(self._client().read(task, depth=READ_DEPTH)) as reads:
            self._compress_reads(task, reads, parts)

    def _compress_reads(
        self,
        task: list[Piece],
        reads: Iterator[tuple[int, memoryview]],
        parts: queue.SimpleQueue[Part],
    ) -> None:
        for offset, length in task:
            packer = PieceCompressor(length, self._level)
            pos = offset
            while pos < offset + length:
                if self._stop.is_set() or self._cancel.is_set():
                    raise Interrupted(f"backup of disk {self._disk} interrupted")
                try:
                    at, chunk = next(reads)
                except StopIteration:
                    raise NbdError(f"reads ended at offset {pos}, inside a piece") from None
                if at != pos or at + len(chunk) > offset + length:
                    raise NbdError(f"read at offset {at} does not continue offset {pos}")
                # One part per chunk read: lz4 makes one per 64 KiB block,
                # too small to pass one by one to the writer.
                made = packer.feed(chunk)
                if made:
                    parts.put(b"".join(made))
                self._progress(len(chunk))
                pos += len(chunk)
            parts.put(b"".join(packer.finish()))
            parts.put(b"")
        # Run the reads to their end: their last buffer goes back to the pool.
        for _extra in reads:
            raise NbdError("the server sent more data than was asked for")

    def _client(self) -> NbdClient:
        client: NbdClient | None = getattr(self._lane, "client", None)
        if client is None:
            client = self._lane.client = self._connect()
            with self._clients_lock:
                self._clients.append(client)
        return client
