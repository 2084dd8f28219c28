"""FolderLock: one holder per folder, refusals that name the holder, stale
locks of killed processes taken over."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from libvirtnbdbackup.errors import FolderLocked, VirtnbdError
from libvirtnbdbackup.targets.lock import LOCK_NAME, FolderLock, lock_holders, pid_alive

HOLDER = """
import sys, time
from libvirtnbdbackup.targets.lock import FolderLock
lock = FolderLock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == "shared",
                  details={"domain": "vm1"}).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@contextmanager
def holder(folder: Path, purpose: str, shared: bool = False) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the folder's lock until the block ends (killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), purpose, "shared" if shared else "excl"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_held_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with holder(tmp_path, "virtnbdrestore into this folder") as proc:
        with pytest.raises(FolderLocked) as refused:
            FolderLock(tmp_path, "virtnbdrestore").acquire()
        assert isinstance(refused.value, VirtnbdError)
        message = str(refused.value)
        assert "virtnbdrestore into this folder" in message
        assert f"pid {proc.pid}" in message
        assert str(tmp_path) in message
        assert lock_holders(tmp_path / LOCK_NAME) == [proc.pid]


def test_a_lock_of_a_killed_process_is_stale_and_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with holder(tmp_path, "virtnbdbackup -l inc of domain vm1") as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (tmp_path / LOCK_NAME).exists(), "a killed holder cannot remove its lock file"
        assert not pid_alive(proc.pid)
        with caplog.at_level(logging.WARNING), FolderLock(tmp_path, "next run") as lock:
            assert lock.stale is not None
            assert lock.stale["pid"] == proc.pid and lock.stale["domain"] == "vm1"
            record = json.loads((tmp_path / LOCK_NAME).read_text())
            assert record["purpose"] == "next run"
        assert "no longer running" in caplog.text and str(proc.pid) in caplog.text


def test_release_removes_the_lock_file_and_frees_the_folder(tmp_path: Path) -> None:
    with FolderLock(tmp_path, "first") as lock:
        assert lock.stale is None
        assert (tmp_path / LOCK_NAME).is_file()
    assert not (tmp_path / LOCK_NAME).exists()
    with FolderLock(tmp_path, "second") as again:
        assert again.stale is None


def test_one_process_cannot_take_a_folder_twice(tmp_path: Path) -> None:
    with FolderLock(tmp_path, "first"), pytest.raises(FolderLocked):
        FolderLock(tmp_path, "second").acquire()


def test_readers_share_a_folder_and_keep_writers_out(tmp_path: Path) -> None:
    with holder(tmp_path, "reader", shared=True) as proc:
        with FolderLock(tmp_path, "another reader", shared=True):
            pass
        with pytest.raises(FolderLocked) as refused:
            FolderLock(tmp_path, "prune").acquire()
        assert f"pid {proc.pid}" in str(refused.value)
    with holder(tmp_path, "writer"), pytest.raises(FolderLocked):
        FolderLock(tmp_path, "reader", shared=True).acquire()


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VirtnbdError, match="no such folder"):
        FolderLock(tmp_path / "missing", "x").acquire()
