"""The conformance suite of backup targets: every target passes all of it.

A new target (an object store) is added to ``TARGETS`` and must pass
unchanged. Each target comes with a way to look at what it holds from
outside (the folder, the bytes of the zip archive), so the suite checks
what a reader would find, not only what the target says about itself.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirtnbdbackup.errors import TargetError
from libvirtnbdbackup.targets.base import Target
from libvirtnbdbackup.targets.directory import DirectoryTarget
from libvirtnbdbackup.targets.memory import MemoryTarget
from libvirtnbdbackup.targets.zipstream import ZipTarget


@dataclass
class Subject:
    target: Target
    outside: Callable[[], dict[str, bytes]]  # what a reader finds, after close()


def directory(tmp_path: Path) -> Subject:
    root = tmp_path / "set"
    target = DirectoryTarget(root)

    def outside() -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    return Subject(target, outside)


class _NoSeek(io.BytesIO):
    """Standard output: written in order, never seeked."""

    def seekable(self) -> bool:
        return False

    def seek(self, *_args: object) -> int:
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")


def zipstream(_tmp_path: Path) -> Subject:
    stream = _NoSeek()
    target = ZipTarget(stream)

    def outside() -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(stream.getvalue())) as archive:
            return {name: archive.read(name) for name in archive.namelist()}

    return Subject(target, outside)


def memory(_tmp_path: Path) -> Subject:
    target = MemoryTarget()
    return Subject(target, lambda: dict(target.files))


TARGETS = {"directory": directory, "zipstream": zipstream, "memory": memory}


@pytest.fixture(params=sorted(TARGETS))
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    yield TARGETS[request.param](tmp_path)


def test_written_files_are_listed_read_and_found_outside(subject: Subject) -> None:
    t = subject.target
    t.write("vmconfig.virtnbdbackup.0.xml", b"<domain/>")
    t.write("checkpoints/virtnbdbackup.0.xml", b"<cp/>")
    assert t.list() == ["checkpoints/virtnbdbackup.0.xml", "vmconfig.virtnbdbackup.0.xml"]
    assert t.read("vmconfig.virtnbdbackup.0.xml") == b"<domain/>"
    t.close()
    assert subject.outside() == {
        "vmconfig.virtnbdbackup.0.xml": b"<domain/>",
        "checkpoints/virtnbdbackup.0.xml": b"<cp/>",
    }


def test_a_data_file_is_invisible_until_committed(subject: Subject) -> None:
    t = subject.target
    sink = t.open_data("vda.full.data")
    for _ in range(3):
        sink.file.write(b"x" * 100_000)
    assert "vda.full.data" not in t.list()
    sink.commit()
    assert t.list() == ["vda.full.data"]
    t.close()
    assert subject.outside() == {"vda.full.data": b"x" * 300_000}


def test_an_aborted_data_file_is_never_listed(subject: Subject) -> None:
    t = subject.target
    sink = t.open_data("vda.full.data")
    sink.file.write(b"half")
    sink.abort()
    assert t.list() == []
    if not t.streamed:  # a stream keeps what it sent; its run then never closes it
        t.close()
        assert subject.outside() == {}


def test_a_data_file_is_never_overwritten(subject: Subject) -> None:
    t = subject.target
    sink = t.open_data("vda.full.data")
    sink.file.write(b"first")
    sink.commit()
    with pytest.raises(TargetError, match=re.escape("vda.full.data")):
        t.open_data("vda.full.data")
    t.close()
    assert subject.outside()["vda.full.data"] == b"first"


def test_copy_file_stores_a_local_file(subject: Subject, tmp_path: Path) -> None:
    source = tmp_path / "OVMF_VARS.fd"
    source.write_bytes(bytes(range(256)) * 5000)
    subject.target.copy_file("OVMF_VARS.fd.virtnbdbackup.0", str(source))
    subject.target.close()
    assert subject.outside()["OVMF_VARS.fd.virtnbdbackup.0"] == source.read_bytes()


def test_rename_and_remove_work_or_refuse_on_a_stream(subject: Subject) -> None:
    t = subject.target
    t.write("a.xml", b"a")
    t.write("b.xml", b"b")
    if t.streamed:
        with pytest.raises(TargetError, match=re.escape("a.xml")):
            t.rename("a.xml", "c.xml")
        with pytest.raises(TargetError, match=re.escape("b.xml")):
            t.remove("b.xml")
        t.close()
        assert subject.outside() == {"a.xml": b"a", "b.xml": b"b"}
        return
    with pytest.raises(TargetError, match=re.escape("b.xml")):
        t.rename("a.xml", "b.xml")  # never over an existing file
    t.rename("a.xml", "chain.1/a.xml")
    t.remove("b.xml")
    t.remove("never-written.xml")  # removing what is not there is no error
    assert t.list() == ["chain.1/a.xml"]
    t.close()
    assert subject.outside() == {"chain.1/a.xml": b"a"}


def test_remove_takes_an_unfinished_data_file_too(subject: Subject) -> None:
    t = subject.target
    if t.streamed:
        pytest.skip("a stream cannot take back what it sent")
    sink = t.open_data("vda.inc.virtnbdbackup.1.data")
    sink.file.write(b"killed here")
    sink.file.flush()
    t.remove("vda.inc.virtnbdbackup.1.data")  # what a killed run left behind
    t.close()
    assert subject.outside() == {}


def test_commit_stores_the_manifest_and_drops_the_journal(subject: Subject) -> None:
    t = subject.target
    t.write("manifest.x.pending", b"journal")
    t.write("vda.full.data.chksum", b"1")
    t.commit("manifest.x.json", b"manifest", replaces="manifest.x.pending")
    assert t.read("manifest.x.json") == b"manifest"
    with pytest.raises(TargetError, match=re.escape("manifest.x.json")):
        t.commit("manifest.x.json", b"again")  # a committed run is never rewritten
    t.close()
    found = subject.outside()
    assert found["manifest.x.json"] == b"manifest"
    if t.streamed:  # superseded by the manifest of the same run
        assert found["manifest.x.pending"] == b"journal"
    else:
        assert "manifest.x.pending" not in found


def test_names_outside_the_set_are_refused(subject: Subject) -> None:
    t = subject.target
    if isinstance(t, DirectoryTarget):
        for name in ("../escape.xml", "/etc/passwd"):
            with pytest.raises(TargetError):
                t.write(name, b"x")
    t.close()
    assert "escape.xml" not in subject.outside()


def test_a_zip_stream_dropped_after_a_failure_is_no_archive() -> None:
    """A run that failed never closes its target: what it streamed must not
    read as a complete set (zipfile would finish it when it is dropped)."""
    stream = _NoSeek()
    target = ZipTarget(stream)
    target.write("vmconfig.virtnbdbackup.0.xml", b"<domain/>")
    sink = target.open_data("vda.full.data")
    sink.file.write(b"x" * 1000)
    sink.commit()
    del target, sink
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(stream.getvalue()))
