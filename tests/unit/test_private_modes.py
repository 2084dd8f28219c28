"""Private files and folders: 0600 and 0700, narrowed further by a stricter
umask, never widened by a laxer one; the libvirt password off the command line."""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirtnbdbackup.cli.common import (
    PASSWORD_ENV,
    add_connection_args,
    libvirt_password,
)
from libvirtnbdbackup.errors import UsageError
from libvirtnbdbackup.targets.directory import DirectoryTarget, write_atomic
from libvirtnbdbackup.targets.private import create_private, make_private_dir, restrict


@pytest.fixture()
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "folder", "file"), [(0o022, 0o700, 0o600), (0o000, 0o700, 0o600),
                                                      (0o277, 0o500, 0o400)])  # fmt: skip
def test_target_files_are_private_unless_the_umask_is_stricter(
    tmp_path: Path, umask: None, mask: int, folder: int, file: int
) -> None:
    os.umask(mask)
    target = DirectoryTarget(tmp_path / "set")
    sink = target.open_data("vda.full.data")
    sink.file.write(b"secret")
    sink.commit()
    write_atomic(tmp_path / "set" / "vm.cpt", b"[]")
    create_private(tmp_path / "set" / "backup.log")
    os.umask(0o022)
    assert mode(tmp_path / "set") == folder
    for name in ("vda.full.data", "vm.cpt", "backup.log"):
        assert mode(tmp_path / "set" / name) == file, name


def test_an_existing_folder_keeps_its_mode(tmp_path: Path, umask: None) -> None:
    (tmp_path / "old").mkdir(mode=0o755)
    assert not make_private_dir(tmp_path / "old")
    assert mode(tmp_path / "old") == 0o755
    assert make_private_dir(tmp_path / "new" / "deeper")
    assert mode(tmp_path / "new" / "deeper") == 0o700


def test_restrict_takes_group_and_other_bits(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"")
    image.chmod(0o664)
    restrict(image)
    assert mode(image) == 0o600
    image.chmod(0o444)
    restrict(image)
    assert mode(image) == 0o400


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_connection_args(parser)
    return parser.parse_args(list(argv))


def test_password_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert libvirt_password(parse()) is None
    secret = tmp_path / "pw"
    secret.write_text("s3cret word\nsecond line\n")
    assert libvirt_password(parse("--password-file", str(secret))) == "s3cret word"
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert libvirt_password(parse()) == "from-env"
    assert libvirt_password(parse("--password-file", str(secret))) == "s3cret word"
    assert libvirt_password(parse("--password", "given")) == "given"
    with pytest.raises(UsageError, match=r"--password-file .*missing: cannot read it"):
        libvirt_password(parse("--password-file", str(tmp_path / "missing")))
