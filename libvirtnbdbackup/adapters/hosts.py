"""Where commands run and files live: this host, or a hypervisor over SSH.

Jobs hand a :class:`Host` to the qemu tools and file operations, so a local
and a remote backup or restore share one code path.
"""

from __future__ import annotations

import os
import shutil
from typing import BinaryIO, Protocol

from ..targets.private import (
    PRIVATE_DIR,
    READABLE_FILE,
    make_private_dir,
    open_private,
    restrict,
)


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

    def makedirs(self, path: str, mode: int = PRIVATE_DIR) -> None:
        """Create a folder (an existing one keeps its mode)."""
        ...

    def restrict(self, path: str) -> None:
        """Take group and other access from a file (one qemu-img created)."""
        ...

    def commit(self, partial: str, final: str) -> None:
        """Flush ``partial`` to disk and rename it to ``final``."""
        ...

    def fetch(self, path: str, dest: str) -> None:
        """Copy the file ``path`` of this host to the local file ``dest``."""
        ...

    def put(self, source: str, path: str, *, readable: bool = False) -> None:
        """Copy the local file ``source`` to ``path`` on this host, atomically;
        private (0600) unless ``readable`` (0644, for a firmware loader that
        QEMU's user reads as it is: libvirt labels NVRAM, kernel and initrd
        for the domain, but not the loader)."""
        ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` on this host, atomically and private (0600)."""
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

    def makedirs(self, path: str, mode: int = PRIVATE_DIR) -> None:
        make_private_dir(path, mode)

    def restrict(self, path: str) -> None:
        restrict(path)

    def commit(self, partial: str, final: str) -> None:
        _fsync(partial)
        os.rename(partial, final)
        _fsync(os.path.dirname(os.path.abspath(final)), os.O_RDONLY | os.O_DIRECTORY)

    def fetch(self, path: str, dest: str) -> None:
        shutil.copyfile(path, dest)

    def put(self, source: str, path: str, *, readable: bool = False) -> None:
        partial = f"{path}.partial"
        with open(source, "rb") as src, _open_private(partial) as out:
            shutil.copyfileobj(src, out, 1024 * 1024)
        if readable:
            os.chmod(partial, READABLE_FILE & ~_umask())
        self.commit(partial, path)

    def write_bytes(self, path: str, data: bytes) -> None:
        partial = f"{path}.partial"
        with _open_private(partial) as fh:
            fh.write(data)
        self.commit(partial, path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_private(path: str) -> BinaryIO:
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")


LOCAL = LocalHost()
