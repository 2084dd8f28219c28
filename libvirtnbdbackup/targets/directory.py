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
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            make_private_dir(self.path)
        except OSError as err:
            raise TargetError(f"cannot create backup folder {self.path}: {err.strerror}") from None

    def open_data(self, name: str) -> PartialFile:
        return PartialFile(self.path / name)

    def write_file(self, name: str, data: bytes) -> None:
        write_atomic(self.path / name, data)

    def copy_file(self, name: str, source: str) -> None:
        sink = PartialFile(self.path / name, overwrite=True)
        try:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, sink.file, 1024 * 1024)
        except OSError as err:
            sink.abort()
            raise TargetError(f"cannot copy {source}: {err.strerror}") from None
        sink.commit()

    def close(self) -> None:
        pass
