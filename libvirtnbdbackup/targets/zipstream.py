"""A stored (uncompressed) zip archive written to a stream, e.g. stdout.

The stream need not be seekable: zipfile then writes data descriptors.
Only one data entry can be open at a time.
"""

from __future__ import annotations

import zipfile
from typing import IO, BinaryIO, cast

from ..errors import TargetError


class ZipEntry:
    def __init__(self, archive: zipfile.ZipFile, name: str) -> None:
        self.name = name
        self._fh = archive.open(name, "w", force_zip64=True)

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
        self._zip.writestr(name, data)

    def copy_file(self, name: str, source: str) -> None:
        self._zip.write(source, name)

    def close(self) -> None:
        self._zip.close()
