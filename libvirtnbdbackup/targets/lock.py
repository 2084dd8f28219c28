"""One process at a time per folder: a backup into a backup folder, a restore
into a restore folder, a prune of a set.

The lock is ``flock`` on a small file in the folder, ``.virtnbdbackup.lock``
(a hidden name, which 2.47 and our own folder scans ignore). The kernel
releases it when its holder dies, however it dies, so a lock can never
outlive its process: a lock file left behind by a killed run is stale by
construction and is taken over, with a warning naming the run that left it.
Its JSON content says who holds it, for the refusal message and for the
next run to see what a killed run was doing (``FolderLock.stale``).

Shared locks (``shared=True``) are for readers that only need the folder to
stay as it is while they read (a restore reading a backup set while a prune
would delete from it); any number of them hold it at once, and an
exclusive lock waits for none of them: it is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import FolderLocked, TargetError
from .private import open_private

log = logging.getLogger(__name__)

LOCK_NAME = ".virtnbdbackup.lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_holders(path: Path) -> list[int]:
    """The pids that hold a flock on ``path``, from /proc/locks (empty if unknown)."""
    try:
        st = path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; blocked waiters have "->".
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev:
            with contextlib.suppress(ValueError):
                pids.append(int(fields[4]))
    return sorted(set(pids))


def describe(record: dict[str, Any] | None, pid: int | None = None) -> str:
    """A holder in words: "virtnbdbackup -l inc of domain vm1 (pid 1234 on hv1, since ...)"."""
    if not record:
        return f"pid {pid}" if pid else "another process"
    where = f"pid {record.get('pid', pid)}"
    if record.get("host") and record.get("host") != socket.gethostname():
        where += f" on {record['host']}"
    since = record.get("started")
    if isinstance(since, (int, float)):
        where += ", since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return f"{record.get('purpose', 'another process')} ({where})"


class FolderLock:
    """``with FolderLock(folder, "virtnbdbackup -l inc of domain vm1"):`` ...

    Raises :class:`FolderLocked` (naming the holder) when another live
    process holds the folder, :class:`TargetError` when the lock file
    cannot be made. ``details`` are extra JSON fields stored with the lock
    (e.g. the domain and checkpoint of a backup); after ``acquire``,
    ``stale`` is the record a dead holder left, or None.
    """

    def __init__(
        self,
        folder: str | Path,
        purpose: str,
        *,
        shared: bool = False,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self.shared = shared
        self.details = details or {}
        self.stale: dict[str, Any] | None = None
        self._fd: int | None = None
        self._started: int | None = None

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            raise TargetError(f"{self.path}: lock taken twice by one process")
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_record(fd)
                os.close(fd)
                raise FolderLocked(self._refusal(record)) from None
            except OSError as err:
                os.close(fd)
                raise TargetError(f"cannot lock {self.path}: {err.strerror}") from None
            # A holder that released (and unlinked) the file between our open
            # and our flock leaves us locking a file no one else will see.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self._fd = fd
        record = _read_record(fd)
        if record and not self.shared and record.get("pid") != os.getpid():
            self.stale = record
            log.warning(
                "%s was left locked by %s, which is no longer running: taken over",
                self.folder,
                describe(record),
            )
        if not self.shared:
            self._write_record()
        return self

    def update(self, **details: Any) -> None:
        """Add ``details`` to the record of a held exclusive lock (e.g. the
        checkpoint a backup is about to create, for the run after a kill)."""
        if self._fd is None or self.shared:
            raise TargetError(f"{self.path}: update of a lock not held exclusively")
        self.details.update(details)
        self._write_record()

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self.shared:
                # Unlink while still holding it: whoever opened the file
                # before sees on flock that it is no longer the lock file.
                with contextlib.suppress(OSError):
                    self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.release()

    def _open(self) -> int:
        try:
            return open_private(self.path, os.O_RDWR | os.O_CREAT)
        except FileNotFoundError:
            raise TargetError(f"cannot lock {self.folder}: no such folder") from None
        except OSError as err:
            raise TargetError(f"cannot create the lock file {self.path}: {err.strerror}") from None

    def _refusal(self, record: dict[str, Any] | None) -> str:
        holders = [p for p in lock_holders(self.path) if p != os.getpid()]
        if record and record.get("pid") not in holders and holders:
            record = None  # the content is of an earlier holder; a reader holds it now
        who = describe(record, holders[0] if holders else None)
        if not record and len(holders) > 1:
            who = "processes " + ", ".join(str(p) for p in holders)
        return (
            f"{self.folder} is in use by {who}: wait for it to finish, or use another "
            f"folder (lock file {self.path})"
        )

    def _write_record(self) -> None:
        assert self._fd is not None
        if self._started is None:
            self._started = int(time.time())
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "started": self._started,
            **self.details,
        }
        data = json.dumps(record).encode()
        try:
            os.pwrite(self._fd, data.ljust(len(data) + 64), 0)
            os.ftruncate(self._fd, len(data) + 64)
        except OSError as err:
            self.release()
            raise TargetError(f"cannot write the lock file {self.path}: {err.strerror}") from None


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 65536, 0)
        record = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)
