"""A backup folder on a local file system.

Every file is written under a ``.partial`` name, flushed to disk and then
renamed, so a file with its final name is always complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from ..errors import TargetError
from .private import make_private_dir
from .writeback import open_write_behind

PARTIAL_SUFFIX = ".partial"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialFile:
    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.name = path.name
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        if path.exists() and not overwrite:
            raise TargetError(f"{path} exists already; refusing to overwrite it")
        try:
            self._fh: BinaryIO = open_write_behind(self.partial)
        except OSError as err:
            raise TargetError(f"cannot create {self.partial}: {err.strerror}") from None

    @property
    def file(self) -> BinaryIO:
        return self._fh

    def commit(self) -> None:
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.rename(self.partial, self.path)
            fsync_dir(self.path.parent)
        except OSError as err:
            self.abort()
            raise TargetError(f"cannot complete {self.path}: {err.strerror}") from None

    def abort(self) -> None:
        # Closing flushes what is buffered, which fails again on a full disk.
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            self.partial.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    sink = PartialFile(path, overwrite=overwrite)
    try:
        sink.file.write(data)
    except OSError as err:
        sink.abort()
        raise TargetError(f"cannot write {path}: {err.strerror}") from None
    sink.commit()


class DirectoryTarget:
    streamed = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            make_private_dir(self.path)
        except OSError as err:
            raise TargetError(f"cannot create backup folder {self.path}: {err.strerror}") from None

    def _path(self, name: str) -> Path:
        path = self.path / name
        if name.startswith("/") or ".." in Path(name).parts:
            raise TargetError(f"{name!r} is not a file name inside {self.path}")
        return path

    def _parent(self, name: str) -> Path:
        path = self._path(name)
        try:
            make_private_dir(path.parent)
        except OSError as err:
            raise TargetError(f"cannot create folder {path.parent}: {err.strerror}") from None
        return path

    def list(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.path))
            for p in self.path.rglob("*")
            if p.is_file() and not p.name.endswith(PARTIAL_SUFFIX)
        )

    def read(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except OSError as err:
            raise TargetError(f"cannot read {self.path / name}: {err.strerror}") from None

    def write(self, name: str, data: bytes) -> None:
        write_atomic(self._parent(name), data)

    def open_data(self, name: str) -> PartialFile:
        return PartialFile(self._parent(name))

    def copy_file(self, name: str, source: str) -> None:
        sink = PartialFile(self._parent(name), overwrite=True)
        try:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, sink.file, 1024 * 1024)
        except OSError as err:
            sink.abort()
            raise TargetError(f"cannot copy {source}: {err.strerror}") from None
        sink.commit()

    def rename(self, old: str, new: str) -> None:
        source, dest = self._path(old), self._parent(new)
        if dest.exists():
            raise TargetError(f"{dest} exists already; refusing to overwrite it")
        try:
            os.rename(source, dest)
            fsync_dir(dest.parent)
        except OSError as err:
            raise TargetError(f"cannot rename {source} to {dest}: {err.strerror}") from None

    def remove(self, name: str) -> None:
        """Remove a file and what a write of it left unfinished."""
        path = self._path(name)
        try:
            for each in (path, path.with_name(path.name + PARTIAL_SUFFIX)):
                each.unlink(missing_ok=True)
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass  # its folder is gone too
        except OSError as err:
            raise TargetError(f"cannot remove {path}: {err.strerror}") from None

    def commit(self, name: str, data: bytes, replaces: str | None = None) -> None:
        # Each data file was fsynced and renamed as it was completed: the
        # manifest, renamed last, is the run's commit point.
        write_atomic(self._parent(name), data, overwrite=False)
        if replaces is not None:
            self.remove(replaces)

    def close(self) -> None:
        pass
