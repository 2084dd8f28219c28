"""The interface every backup target offers: where a backup set lives.

A target holds named files (names may contain ``/`` for sub-folders). The
jobs write a set only through it, so a new kind of target (an object store)
is one new class that passes ``tests/unit/test_targets.py``.

- ``write`` stores a small file whole (atomically: its old content or its
  new one, never a mix); ``open_data`` streams a large file that stays
  invisible until its sink is committed, and is gone when aborted.
- ``list`` names the complete files; ``read`` returns one of them.
- ``rename`` and ``remove`` change the set. A ``streamed`` target (a zip on
  standard output) cannot take back what it wrote: both raise
  :class:`TargetError` there, and ``read`` gives back only files stored
  with ``write`` or ``commit``. ``copy_file`` stores a local file (a zip
  entry keeps its modification time).
- ``commit`` is the commit point of a backup run: it stores the run's
  manifest last and durably, and then drops ``replaces`` (the run's
  journal) where the target can.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol


class DataSink(Protocol):
    """A data file being written: committed whole, or not at all."""

    name: str

    @property
    def file(self) -> BinaryIO: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Writable(Protocol):
    """The writing half of a target, which a job's run of files offers too."""

    def write(self, name: str, data: bytes) -> None: ...

    def open_data(self, name: str) -> DataSink: ...


class Target(Protocol):
    streamed: bool

    def list(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...

    def write(self, name: str, data: bytes) -> None: ...

    def open_data(self, name: str) -> DataSink: ...

    def copy_file(self, name: str, source: str) -> None: ...

    def rename(self, old: str, new: str) -> None: ...

    def remove(self, name: str) -> None: ...

    def commit(self, name: str, data: bytes, replaces: str | None = None) -> None: ...

    def close(self) -> None: ...
