"""Locks of a fleet run (targets/lock.py's FolderLock): one on each VM's
folder ROOT/HOST/VM while its backup runs, one per NBD port handed out.

The VM folder's lock keeps two fleet runs (or a fleet run and a prune of
the VM's folders) from working on one VM at once; virtnbdbackup itself
locks the period folder below it. Port locks live in /run/virtnbdfleet,
so concurrent fleet runs on this backup host never hand out the same port.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FolderLocked, TargetError
from .lock import FolderLock
from .private import make_private_dir

PORT_LOCK_DIR = Path("/run/virtnbdfleet/ports")


def lock_vm_folder(folder: Path, purpose: str) -> FolderLock:
    """The lock of one VM's folder; FolderLocked when another run holds it."""
    make_private_dir(folder)  # it holds the VM's backups
    return FolderLock(folder, purpose).acquire()


class PortPool:
    """NBD ports ``first`` .. ``first + count - 1`` of one hypervisor.

    Each job leases a block of consecutive ports (a shut-off domain needs
    one per disk), each port locked in its own folder of ``lock_dir``.
    """

    def __init__(self, host: str, first: int, count: int, lock_dir: Path = PORT_LOCK_DIR) -> None:
        self.host = host
        self.first = first
        self.count = min(count, 65536 - first)
        self.lock_dir = lock_dir

    def lease(self, size: int, purpose: str) -> PortLease | None:
        """A block of ``size`` ports, or None when none is free now."""
        if size > self.count:
            raise TargetError(
                f"{purpose} needs {size} NBD ports, but hypervisor {self.host} has {self.count} "
                f"(from {self.first}): raise nbd_ports"
            )
        start = self.first
        while start + size <= self.first + self.count:
            locks: list[FolderLock] = []
            for port in range(start, start + size):
                folder = self.lock_dir / f"{self.host}.{port}"
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    locks.append(FolderLock(folder, f"NBD port of {purpose}").acquire())
                except FolderLocked:
                    break
            if len(locks) == size:
                return PortLease(start, locks)
            for lock in locks:
                lock.release()
            start += len(locks) + 1  # past the port that is taken
        return None


@dataclass
class PortLease:
    first: int
    locks: list[FolderLock]

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []
