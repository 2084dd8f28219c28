"""Compression lanes: pieces compressed on several threads come out in file order."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import pytest

from libvirtnbdbackup.errors import NbdError
from libvirtnbdbackup.format.writer import compress_pieces, piece_lengths
from libvirtnbdbackup.jobs import compresslanes
from libvirtnbdbackup.jobs.compresslanes import CompressionLanes, compression_tasks


def disk_byte(offset: int) -> int:
    return (offset * 7 + offset // 1000) % 251


class FakeClient:
    """Reads a made-up disk, in the chunks a real NbdClient hands out."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.closed = False
        self.threads: set[str] = set()

    def read(
        self, ranges: Iterable[tuple[int, int]], chunk: int = 700, depth: int = 16
    ) -> Iterator[tuple[int, memoryview]]:
        """Chunks of 700 bytes by default: many per piece, none lined up with one."""
        self.threads.add(threading.current_thread().name)
        for start, length in ranges:
            for offset in range(start, start + length, chunk):
                if self.fail_at is not None and offset >= self.fail_at:
                    raise NbdError(f"read at offset {offset} failed")
                n = min(chunk, start + length - offset)
                yield offset, memoryview(bytes(disk_byte(x) for x in range(offset, offset + n)))

    def close(self) -> None:
        self.closed = True


def test_tasks_group_small_pieces_and_keep_big_ones_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compresslanes, "TASK_BYTES", 1000)
    data = [(0, 300), (500, 300), (1000, 2500), (4000, 100)]
    tasks = compression_tasks(data, max_piece=1000)
    assert tasks == [
        [(0, 300), (500, 300)],
        [(1000, 1000)],
        [(2000, 1000)],
        [(3000, 500), (4000, 100)],
    ]


def test_pieces_come_out_in_order_with_the_bytes_of_a_one_shot_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compresslanes, "TASK_BYTES", 3000)
    data = [(0, 100), (1000, 5000), (9000, 70000), (90000, 64)]
    clients: list[FakeClient] = []

    def connect() -> FakeClient:
        clients.append(FakeClient())
        return clients[-1]

    read: list[int] = []
    expected = []
    for start, length in data:
        for n in piece_lengths(length, 2000):
            raw = bytes(map(disk_byte, range(start, start + n)))
            expected.append(b"".join(compress_pieces(raw, 2)))
            start += n
    with CompressionLanes(
        connect,  # type: ignore[arg-type]
        data,
        max_piece=2000,
        level=2,
        lanes=3,
        progress=read.append,
        cancel=threading.Event(),
        disk="vda",
    ) as lanes:
        got = [b"".join(lanes.next_piece()) for _ in expected]
    assert got == expected
    assert sum(read) == sum(length for _start, length in data)
    assert 1 < len(clients) <= 3  # a connection per lane
    assert all(c.closed for c in clients)


def test_a_failing_lane_fails_the_piece_being_written() -> None:
    with (
        pytest.raises(NbdError, match="read at offset 4000 failed"),
        CompressionLanes(
            lambda: FakeClient(fail_at=4000),  # type: ignore[arg-type,return-value]
            [(0, 10000)],
            max_piece=2000,
            level=2,
            lanes=2,
            progress=lambda _n: None,
            cancel=threading.Event(),
            disk="vda",
        ) as lanes,
    ):
        for _ in range(5):
            b"".join(lanes.next_piece())
