"""Write-behind: files start going to disk while they are written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libvirtnbdbackup.targets import writeback
from libvirtnbdbackup.targets.directory import PartialFile
from libvirtnbdbackup.targets.writeback import WriteBehind, WriteBehindFile


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The file descriptors writeback was started for, in order."""
    calls: list[int] = []
    monkeypatch.setattr(writeback, "start_writeback", calls.append)
    return calls


def test_writeback_starts_every_so_many_bytes(tmp_path: Path, started: list[int]) -> None:
    path = tmp_path / "f"
    with WriteBehindFile(path, "wb", every=250) as fh:
        for i in range(10):
            fh.write(bytes([i]) * 100)
        assert started == [fh.fileno()] * 3  # after 300, 600 and 900 bytes
    assert path.read_bytes() == b"".join(bytes([i]) * 100 for i in range(10))


def test_watching_a_file_another_writer_fills(tmp_path: Path, started: list[int]) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"")
    with WriteBehind.watch(str(path), every=1000) as behind:
        for _ in range(5):
            behind.wrote(600)
        assert started == [behind.fd, behind.fd]  # after 1200 bytes, and 1200 more


def test_data_files_are_written_behind(tmp_path: Path, started: list[int]) -> None:
    sink = PartialFile(tmp_path / "vda.full.data")
    sink.file.write(bytes(writeback.WRITE_BEHIND))
    assert len(started) == 1
    sink.commit()
    assert (tmp_path / "vda.full.data").stat().st_size == writeback.WRITE_BEHIND


def test_the_kernel_takes_the_request_on_a_read_only_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 65536)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert writeback.start_writeback(fd)
    finally:
        os.close(fd)
