"""A stored (uncompressed) zip archive written to a stream, e.g. stdout.

The stream need not be seekable: zipfile then writes data descriptors.
Only one data entry can be open at a time. Every entry is a regular file
of mode 0644 dated when it was written (a copied file: its modification
time), as 2.x's archives are; unzip then restores sane modes and dates.

What is streamed cannot be taken back: the target is ``streamed``, rename
and remove are refused, and an archive whose run failed is never closed,
so it has no central directory and no zip reader takes it for a set.
"""

from __future__ import annotations

import os
import time
import zipfile
from typing import IO, BinaryIO, cast

from ..errors import TargetError

ENTRY_MODE = 0o100644  # regular file, rw-r--r--


def entry_info(name: str, when: float | None = None) -> zipfile.ZipInfo:
    stamp = time.localtime(time.time() if when is None else when)
    info = zipfile.ZipInfo(name, date_time=stamp[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = ENTRY_MODE << 16
    return info


class _Archive(zipfile.ZipFile):
    def __del__(self) -> None:
        # zipfile completes an archive it drops: one dropped after a failed
        # run must stay without its central directory.
        pass


class ZipEntry:
    def __init__(self, target: ZipTarget, name: str, when: float | None = None) -> None:
        self.name = name
        self._target = target
        self._fh = target.archive.open(entry_info(name, when), "w", force_zip64=True)

    @property
    def file(self) -> BinaryIO:
        return cast(BinaryIO, self._fh)

    def commit(self) -> None:
        self._fh.close()
        self._target.names.append(self.name)

    def abort(self) -> None:
        # An entry already streamed cannot be taken back; the archive as a
        # whole is then incomplete and the job fails.
        self._fh.close()


class ZipTarget:
    streamed = True

    def __init__(self, stream: IO[bytes]) -> None:
        try:
            self.archive = _Archive(stream, "w", zipfile.ZIP_STORED, allowZip64=True)
        except OSError as err:
            raise TargetError(f"cannot write the zip archive: {err.strerror}") from None
        self.names: list[str] = []
        self._small: dict[str, bytes] = {}  # files stored whole, for read()

    def list(self) -> list[str]:
        return sorted(set(self.names))

    def read(self, name: str) -> bytes:
        if name not in self._small:
            raise TargetError(f"{name} cannot be read back from the zip stream")
        return self._small[name]

    def write(self, name: str, data: bytes) -> None:
        if name in self._small:
            raise TargetError(f"{name} is in the zip stream already and cannot be replaced")
        self.archive.writestr(entry_info(name), data)
        self._small[name] = data
        self.names.append(name)

    def open_data(self, name: str) -> ZipEntry:
        self._refuse_existing(name)
        return ZipEntry(self, name)

    def copy_file(self, name: str, source: str) -> None:
        self._refuse_existing(name)
        entry = ZipEntry(self, name, os.stat(source).st_mtime)
        try:
            with open(source, "rb") as src:
                while chunk := src.read(1024 * 1024):
                    entry.file.write(chunk)
        except OSError as err:
            entry.abort()
            raise TargetError(f"cannot copy {source}: {err.strerror}") from None
        entry.commit()

    def _refuse_existing(self, name: str) -> None:
        if name in self.names:
            raise TargetError(f"{name} is in the zip stream already; refusing to overwrite it")

    def rename(self, old: str, new: str) -> None:
        raise TargetError(f"cannot rename {old} in a zip stream: it is written already")

    def remove(self, name: str) -> None:
        raise TargetError(f"cannot remove {name} from a zip stream: it is written already")

    def commit(self, name: str, data: bytes, replaces: str | None = None) -> None:
        # ``replaces`` stays in the archive: a manifest of the same run supersedes it.
        self.write(name, data)
        fp = self.archive.fp
        if fp is not None:
            try:
                fp.flush()
            except OSError as err:
                raise TargetError(f"cannot write the zip archive: {err.strerror}") from None

    def close(self) -> None:
        self.archive.close()
