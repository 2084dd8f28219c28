"""Files and folders only their owner can read.

A backup holds every secret of the VMs it covers, so everything this tool
creates in a backup or restore folder is private: folders 0700, files 0600.
The modes are passed to the system calls that create them, which the umask
then narrows further: an admin's stricter umask still wins, a laxer one no
longer widens them. Files that other programs create for us (qemu-img
makes the restored images) lose their group and other bits right after.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
READABLE_FILE = 0o644  # a firmware loader: public code QEMU's user must read
# For --boot and restores defined in libvirt: QEMU's user must reach the
# files below, nobody else list the folder.
TRAVERSE_DIR = 0o711


def make_private_dir(path: str | os.PathLike[str], mode: int = PRIVATE_DIR) -> bool:
    """Create the folder (and missing parents) with ``mode``; True if it
    was made now. An existing folder keeps its mode: it is the admin's."""
    folder = Path(path)
    if folder.is_dir():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=mode)
    except FileExistsError:
        return False
    return True


def open_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY | os.O_CREAT) -> int:
    """``os.open`` of a file that, if created, is created 0600."""
    return os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE)


def create_private(path: str | os.PathLike[str]) -> None:
    """Create an empty private file if it is missing (e.g. before a log
    handler opens it for appending)."""
    os.close(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND))


def restrict(path: str | os.PathLike[str]) -> None:
    """Take group and other access from a file another program created."""
    os.chmod(path, os.stat(path).st_mode & 0o700)
