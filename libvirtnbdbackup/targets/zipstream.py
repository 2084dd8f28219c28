"""A stored (uncompressed) zip archive written to a stream, e.g. stdout.

The stream need not be seekable: zipfile then writes data descriptors.
Only one data entry can be open at a time. Every entry is a regular file
of mode 0644 dated when it was written (a copied file: its modification
time), as 2.x's archives are; unzip then restores sane modes and dates.
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


class ZipEntry:
    def __init__(self, archive: zipfile.ZipFile, name: str) -> None:
        self.name = name
        self._fh = archive.open(entry_info(name), "w", force_zip64=True)

    @property
    def file(self) -> BinaryIO:
        return cast(BinaryIO, self._fh)

    def commit(self) -> None:
        self._fh.close()

    def abort(self) -> None:
        # An entry already streamed cannot be taken back; the archive as a
        # whole is then incomplete and the job fails.
        self._fh.close()


class ZipTarget:
    def __init__(self, stream: IO[bytes]) -> None:
        try:
            self._zip = zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True)
        except OSError as err:
            raise TargetError(f"cannot write the zip archive: {err.strerror}") from None

    def open_data(self, name: str) -> ZipEntry:
        return ZipEntry(self._zip, name)

    def write_file(self, name: str, data: bytes) -> None:
        self._zip.writestr(entry_info(name), data)

    def copy_file(self, name: str, source: str) -> None:
        with open(source, "rb") as src, self._zip.open(
            entry_info(name, os.stat(source).st_mtime), "w", force_zip64=True
        ) as dst:
            while chunk := src.read(1024 * 1024):
                dst.write(chunk)

    def close(self) -> None:
        self._zip.close()
