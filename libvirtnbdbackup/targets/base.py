"""The interface every backup target offers to the jobs."""

from __future__ import annotations

from typing import BinaryIO, Protocol


class DataSink(Protocol):
    """A data file being written: committed whole, or not at all."""

    name: str

    @property
    def file(self) -> BinaryIO: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Target(Protocol):
    def open_data(self, name: str) -> DataSink: ...

    def write_file(self, name: str, data: bytes) -> None: ...

    def copy_file(self, name: str, source: str) -> None: ...

    def close(self) -> None: ...
