"""Block devices on an NBD export: /dev/nbdX, or a loop device over nbdfuse.

Where the kernel has the nbd module, ``qemu-nbd --connect`` attaches the
export to /dev/nbdX. Elsewhere ``nbdfuse`` shows the export as a file in a
FUSE mount and ``losetup --partscan`` makes a loop device of it, whose
partitions appear as /dev/loopNpM. Both undo everything they set up, in
reverse order, also after the NBD server went away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path

from ..errors import NbdError
from .command import run_tool

log = logging.getLogger(__name__)

FUSE_FILE = "disk"
READY_TIMEOUT = 30.0
DETACH_TIMEOUT = 10.0


def kernel_has_nbd() -> bool:
    return Path("/sys/module/nbd").exists() or Path("/dev/nbd0").exists()


def _run(cmd: list[str], what: str) -> str:
    package = {"qemu-nbd": "qemu-utils", "fusermount3": "fuse3"}.get(cmd[0], "util-linux")
    return run_tool(cmd, what, NbdError, package)


def partitions(device: str) -> list[str]:
    """Partition device nodes of a whole-disk device, in order."""
    name = os.path.basename(device)
    sysfs = Path("/sys/class/block") / name
    if not sysfs.exists():
        return []
    found = sorted(
        (int((p / "partition").read_text()), f"/dev/{p.name}")
        for p in sysfs.iterdir()
        if p.name.startswith(name) and (p / "partition").exists()
    )
    return [dev for _n, dev in found]


def add_partitions(device: str) -> None:
    """Make the partitions of ``device`` appear as /dev/DEVICEpN (or DEVICEN).

    The kernel scans the partition table itself when it has the parser;
    where it was built without one, ``partx --add`` reads the table in
    user space and tells the kernel. A disk without a table has none.
    """
    if not partitions(device):
        try:
            _run(["partx", "--add", device], f"read the partition table of {device}")
        except NbdError as err:
            log.debug("%s", err)
    nodes = partitions(device)
    deadline = time.monotonic() + 5
    while not all(os.path.exists(n) for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.05)


class KernelNbdDevice:
    """/dev/nbdX attached to the export by ``qemu-nbd --connect``."""

    def __init__(self, device: str, uri: str, *, readonly: bool) -> None:
        self.device = device
        self.uri = uri
        self.readonly = readonly
        self.connected = False

    def start(self) -> None:
        if not os.path.exists(self.device):
            raise NbdError(f"{self.device} does not exist (modprobe nbd max_part=16?)")
        cmd = ["qemu-nbd", "--connect", self.device, "--format", "raw"]
        if self.readonly:
            cmd += ["--read-only"]
        _run([*cmd, self.uri], f"attach {self.uri} to {self.device}")
        self.connected = True
        add_partitions(self.device)

    def alive(self) -> bool:
        return True  # qemu-nbd runs detached; the NBD server's health is checked instead

    def stop(self) -> None:
        if self.connected:
            _run(["qemu-nbd", "--disconnect", self.device], f"detach {self.device}")
            self.connected = False


def _detached(device: str) -> bool:
    """Wait until the kernel has let go of a loop device we detached.

    ``losetup --detach`` of a device that is still open (a partition scan,
    a prober, losetup's own descriptor) only marks it to be cleared on the
    last close, and the kernel clears it after losetup returned: success
    means it is gone.
    """
    backing = Path("/sys/block") / os.path.basename(device) / "loop" / "backing_file"
    deadline = time.monotonic() + DETACH_TIMEOUT
    while backing.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def loops_backed_by(path: Path) -> list[str]:
    """Loop devices whose backing file is ``path`` (by the name the kernel keeps,
    which still answers when the FUSE mount behind it is gone)."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            name = backing.read_text().strip().removesuffix(" (deleted)")
            if name == str(path):
                found.append(f"/dev/{backing.parent.parent.name}")
    return found


class FuseLoopDevice:
    """A loop device on the file that ``nbdfuse`` makes of the export."""

    def __init__(self, uri: str, mountpoint: Path, *, readonly: bool) -> None:
        self.uri = uri
        self.mountpoint = mountpoint
        self.readonly = readonly
        self.device: str | None = None
        self._fuse: subprocess.Popen[bytes] | None = None
        self._made_mountpoint = False

    @property
    def file(self) -> Path:
        return self.mountpoint / FUSE_FILE

    def start(self) -> None:
        self.mountpoint.mkdir(mode=0o700)
        self._made_mountpoint = True
        cmd = ["nbdfuse"]
        if self.readonly:
            cmd += ["--readonly"]
        cmd += [str(self.file), self.uri]
        log.debug("running %s", " ".join(cmd))
        try:
            self._fuse = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except FileNotFoundError:
            raise NbdError(
                "nbdfuse is not installed (Debian 12: apt install libnbd-bin fuse3)"
            ) from None
        deadline = time.monotonic() + READY_TIMEOUT
        while not (os.path.ismount(self.mountpoint) and self.file.exists()):
            if self._fuse.poll() is not None:
                err = self._fuse.stderr.read().decode(errors="replace") if self._fuse.stderr else ""
                raise NbdError(f"nbdfuse failed: {err.strip() or f'exit {self._fuse.returncode}'}")
            if time.monotonic() > deadline:
                raise NbdError(f"nbdfuse did not mount {self.mountpoint} in {READY_TIMEOUT}s")
            time.sleep(0.02)
        cmd = ["losetup", "--find", "--show", "--partscan"]
        if self.readonly:
            cmd += ["--read-only"]
        self.device = _run([*cmd, str(self.file)], f"set up a loop device on {self.file}").strip()
        add_partitions(self.device)

    def alive(self) -> bool:
        return self._fuse is not None and self._fuse.poll() is None

    def stop(self) -> None:
        problems = []
        # Also a loop device that losetup made but whose name never reached us
        # (a signal while it ran): the kernel knows which file backs it.
        devices = {self.device} if self.device else set()
        devices |= set(loops_backed_by(self.file))
        for device in sorted(devices):
            try:
                _run(["losetup", "--detach", device], f"detach {device}")
            except NbdError as err:
                problems.append(str(err))
                continue
            if not _detached(device):
                problems.append(
                    f"{device} is still attached {DETACH_TIMEOUT:.0f}s after losetup --detach "
                    f"(still open? see fuser -v {device}); detach it with: losetup -d {device}"
                )
        self.device = None
        if self._fuse is not None:
            if os.path.ismount(self.mountpoint):
                try:
                    _run(["fusermount3", "-u", str(self.mountpoint)], "unmount nbdfuse")
                except NbdError:
                    # Still busy (a partition mounted by the user keeps the loop
                    # device): detach lazily, the kernel finishes when it is free.
                    with contextlib.suppress(NbdError):
                        _run(["fusermount3", "-u", "-z", str(self.mountpoint)], "unmount nbdfuse")
            try:
                self._fuse.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._fuse.kill()
                self._fuse.wait()
            if self._fuse.stderr:
                self._fuse.stderr.close()
            self._fuse = None
        if self._made_mountpoint:
            try:
                self.mountpoint.rmdir()
                self._made_mountpoint = False
            except OSError as err:
                problems.append(f"cannot remove {self.mountpoint}: {err.strerror}")
        if problems:
            raise NbdError("; ".join(problems))
