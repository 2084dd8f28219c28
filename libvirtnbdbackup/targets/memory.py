"""A backup set held in memory: the reference target of the conformance
tests, and a fast target for the tests of the jobs above it."""

from __future__ import annotations

import io
from typing import BinaryIO

from ..errors import TargetError


class MemorySink:
    def __init__(self, target: MemoryTarget, name: str) -> None:
        self.name = name
        self._target = target
        self._buffer = io.BytesIO()

    @property
    def file(self) -> BinaryIO:
        return self._buffer

    def commit(self) -> None:
        self._target.files[self.name] = self._buffer.getvalue()
        self._target.log.append(("commit-data", self.name))

    def abort(self) -> None:
        self._buffer = io.BytesIO()


class MemoryTarget:
    streamed = False

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []  # (operation, name), in order
        self.closed = False

    def list(self) -> list[str]:
        return sorted(self.files)

    def read(self, name: str) -> bytes:
        if name not in self.files:
            raise TargetError(f"no file {name} in the backup set")
        return self.files[name]

    def write(self, name: str, data: bytes) -> None:
        self.files[name] = bytes(data)
        self.log.append(("write", name))

    def open_data(self, name: str) -> MemorySink:
        if name in self.files:
            raise TargetError(f"{name} exists already; refusing to overwrite it")
        return MemorySink(self, name)

    def copy_file(self, name: str, source: str) -> None:
        try:
            with open(source, "rb") as src:
                self.write(name, src.read())
        except OSError as err:
            raise TargetError(f"cannot copy {source}: {err.strerror}") from None

    def rename(self, old: str, new: str) -> None:
        if old not in self.files:
            raise TargetError(f"no file {old} in the backup set")
        if new in self.files:
            raise TargetError(f"{new} exists already; refusing to overwrite it")
        self.files[new] = self.files.pop(old)
        self.log.append(("rename", new))

    def remove(self, name: str) -> None:
        self.files.pop(name, None)
        self.log.append(("remove", name))

    def commit(self, name: str, data: bytes, replaces: str | None = None) -> None:
        if name in self.files:
            raise TargetError(f"{name} exists already; refusing to overwrite it")
        self.files[name] = bytes(data)
        self.log.append(("commit", name))
        if replaces is not None:
            self.remove(replaces)

    def close(self) -> None:
        self.closed = True
