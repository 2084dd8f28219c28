"""Where commands run and files live: this host, or a hypervisor over SSH.

Jobs hand a :class:`Host` to the qemu tools and file operations, so a local
and a remote backup or restore share one code path.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Protocol

from ..targets.private import (
    PRIVATE_DIR,
    READABLE_FILE,
    make_private_dir,
    open_private,
    restrict,
)

SCRATCH_PREFIX = "virtnbdbackup."


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

    def make_scratch_dir(self, parent: str, owner: str | None) -> str:
        """A new folder of unpredictable name in ``parent``, mode 0700, given
        to ``owner`` (``UID:GID``, QEMU's user, which creates files in it)."""
        ...

    def remove_tree(self, path: str) -> None:
        """Remove a folder and what it holds; a missing one is no error."""
        ...

    def forward(self, remote_socket: str) -> AbstractContextManager[str]:
        """A local path that reaches the unix socket ``remote_socket`` of this host."""
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

    def make_scratch_dir(self, parent: str, owner: str | None) -> str:
        folder = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)
        if owner and os.geteuid() == 0:
            user, _, group = owner.partition(":")
            os.chown(folder, _id(user, pwd.getpwnam), _id(group, grp.getgrnam))
        return folder

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def forward(self, remote_socket: str) -> AbstractContextManager[str]:
        return contextlib.nullcontext(remote_socket)

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


def _id(name: str, lookup: Callable[[str], Any]) -> int:
    return int(name) if name.isdigit() else int(lookup(name)[2])


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_private(path: str) -> BinaryIO:
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")


LOCAL = LocalHost()
