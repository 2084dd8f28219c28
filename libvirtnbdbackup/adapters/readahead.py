"""Reading an NBD export on a thread of its own, ahead of its consumer.

With one thread doing both, the reads and the consumer's work (a backup's
file writes and checksum) take turns: while the thread writes, nobody takes
the server's replies off the socket and they back up. Here a reader thread
keeps the requests in flight and hands each filled buffer over a bounded
queue; the consumer hands it back to the pool once done with it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable
from dataclasses import dataclass

from .nbdclient import BUFFERS, READ_CHUNK, READ_DEPTH, NbdClient

# Filled buffers waiting for the consumer, on top of the reads in flight:
# 16 MiB of 512 KiB chunks.
READ_AHEAD = 32


@dataclass(frozen=True)
class _End:
    """The reader's last item: the reads ended, by ``error`` if not None."""

    error: BaseException | None = None


_Item = tuple[int, memoryview] | _End


def read_ahead(
    client: NbdClient,
    ranges: Iterable[tuple[int, int]],
    *,
    chunk: int = READ_CHUNK,
    depth: int = READ_DEPTH,
    ahead: int = READ_AHEAD,
    name: str = "nbd-read",
) -> Generator[tuple[int, memoryview], None, None]:
    """``client.read(ranges)`` run on a thread: the same ``(offset, data)``
    in order, each view valid until the next one is asked for.

    An error of the reads is raised here, as the reads raise it. Closing the
    generator (or leaving it by an error) stops the thread and waits for it:
    its reads in flight have then ended and every buffer is back in the pool.
    """
    filled: queue.Queue[_Item] = queue.Queue(ahead)
    stop = threading.Event()
    thread = threading.Thread(
        target=_read, args=(client, ranges, chunk, depth, filled, stop), name=name, daemon=True
    )
    thread.start()
    ended = False
    try:
        while True:
            item = filled.get()
            if isinstance(item, _End):
                ended = True
                if item.error is not None:
                    raise item.error
                return
            at, view = item
            try:
                yield at, view
            finally:
                BUFFERS.put(view)
    finally:
        stop.set()
        # The reader may be blocked on a full queue: take what it still
        # hands over until its last item.
        while not ended:
            item = filled.get()
            if isinstance(item, _End):
                ended = True
            else:
                BUFFERS.put(item[1])
        thread.join()


def _read(
    client: NbdClient,
    ranges: Iterable[tuple[int, int]],
    chunk: int,
    depth: int,
    filled: queue.Queue[_Item],
    stop: threading.Event,
) -> None:
    """The reader thread: every item it takes from the reads, then one ``_End``."""
    end = _End()
    reads = client.read_buffers(ranges, chunk, depth)
    try:
        for item in reads:
            if stop.is_set():
                BUFFERS.put(item[1])
                break
            filled.put(item)
    except BaseException as err:
        end = _End(err)
    finally:
        try:
            # Now, in this thread: the reads in flight end before the
            # consumer learns that the reader is done.
            reads.close()
        except BaseException as err:
            end = _End(end.error or err)
        filled.put(end)
