"""Where commands run and files live: this host, or a hypervisor over SSH.

Jobs hand a :class:`Host` to the qemu tools and file operations, so a local
and a remote backup or restore share one code path.
"""

from __future__ import annotations

import os
import shutil
from typing import Protocol


class Host(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def is_remote(self) -> bool: ...

    def command(self, argv: list[str], *, dedicated: bool = False) -> list[str]:
        """The local command line that runs ``argv`` on this host;
        ``dedicated`` for a long-running command."""
        ...

    def close(self) -> None:
        """Release what reaching the host took (connections)."""
        ...

    def exists(self, path: str) -> bool: ...

    def remove(self, path: str) -> None:
        """Remove a file; a missing file is no error."""
        ...

    def makedirs(self, path: str) -> None: ...

    def commit(self, partial: str, final: str) -> None:
        """Flush ``partial`` to disk and rename it to ``final``."""
        ...

    def fetch(self, path: str, dest: str) -> None:
        """Copy the file ``path`` of this host to the local file ``dest``."""
        ...

    def put(self, source: str, path: str) -> None:
        """Copy the local file ``source`` to ``path`` on this host, atomically."""
        ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` on this host, atomically."""
        ...


def _fsync(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalHost:
    """This machine."""

    name = "localhost"
    is_remote = False

    def command(self, argv: list[str], *, dedicated: bool = False) -> list[str]:
        return argv

    def close(self) -> None:
        pass

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def remove(self, path: str) -> None:
        if os.path.lexists(path):
            os.unlink(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def commit(self, partial: str, final: str) -> None:
        _fsync(partial)
        os.rename(partial, final)
        _fsync(os.path.dirname(os.path.abspath(final)), os.O_RDONLY | os.O_DIRECTORY)

    def fetch(self, path: str, dest: str) -> None:
        shutil.copyfile(path, dest)

    def put(self, source: str, path: str) -> None:
        partial = f"{path}.partial"
        shutil.copyfile(source, partial)
        self.commit(partial, path)

    def write_bytes(self, path: str, data: bytes) -> None:
        partial = f"{path}.partial"
        with open(partial, "wb") as fh:
            fh.write(data)
        self.commit(partial, path)


LOCAL = LocalHost()
