"""The commit point of a backup run: journal first, manifest last."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import pytest

from libvirtnbdbackup.errors import StreamError, TargetError
from libvirtnbdbackup.format.manifest import (
    FileEntry,
    Manifest,
    SetWriter,
    chain_identity,
    manifest_name,
    pending_name,
    read_state,
    roll_back,
    unlisted_data_files,
    write_set,
)
from libvirtnbdbackup.jobs.backupoptions import backup_set_files
from libvirtnbdbackup.targets.directory import DirectoryTarget
from libvirtnbdbackup.targets.memory import MemoryTarget

DATA = b"meta" + bytes(range(256)) * 400


def run_of(target: MemoryTarget | DirectoryTarget, ident: str = "virtnbdbackup.0") -> SetWriter:
    run = SetWriter(target, ident=ident, level="full", chain="c0ffee")
    run.begin()
    return run


def test_the_manifest_is_written_last_and_lists_every_file() -> None:
    target = MemoryTarget()
    run = run_of(target)
    sink = run.open_data("vda.full.data")
    sink.file.write(DATA[:1000])
    sink.file.write(DATA[1000:])
    sink.commit()
    run.write("vda.full.data.chksum", b"42")
    manifest = run.commit()
    journal = pending_name("virtnbdbackup.0")
    assert target.log[-2:] == [("commit", manifest.name), ("remove", journal)]
    assert journal not in target.files
    doc = json.loads(target.files["manifest.virtnbdbackup.0.json"])
    assert doc["chain"] == "c0ffee" and doc["level"] == "full"
    assert doc["files"] == {
        "vda.full.data": {"size": len(DATA), "adler32": zlib.adler32(DATA)},
        "vda.full.data.chksum": {"size": 2, "adler32": zlib.adler32(b"42")},
    }
    assert Manifest.from_bytes(target.files[manifest.name], "m") == manifest


def test_the_journal_names_each_file_before_it_exists() -> None:
    target = MemoryTarget()
    run = run_of(target)
    journal = pending_name("virtnbdbackup.0")
    assert json.loads(target.files[journal])["files"] == []
    sink = run.open_data("vda.full.data")
    assert json.loads(target.files[journal])["files"] == ["vda.full.data"]
    sink.abort()


def test_a_seek_drops_the_sum_but_keeps_the_size() -> None:
    """Raw images are written with seeks (holes): size yes, no sum."""
    target = MemoryTarget()
    run = run_of(target)
    sink = run.open_data("vdc.copy.data")
    sink.file.write(b"a" * 10)
    sink.file.seek(4096)
    sink.file.write(b"b" * 10)
    sink.file.truncate(8192)
    sink.commit()
    assert run.files["vdc.copy.data"] == FileEntry(8192, None)


def test_a_failed_run_takes_back_what_it_wrote(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)
    (tmp_path / "vda.full.data").write_bytes(b"an earlier run's")  # not this run's
    run = run_of(target, "virtnbdbackup.1")
    sink = run.open_data("vdb.inc.virtnbdbackup.1.data")
    sink.file.write(b"done")
    sink.commit()
    run.write("vdb.inc.virtnbdbackup.1.data.chksum", b"1")
    unfinished = run.open_data("vdc.inc.virtnbdbackup.1.data")
    unfinished.file.write(b"half")  # the disk that failed: its sink is left open
    assert run.abort() == ["vdb.inc.virtnbdbackup.1.data", "vdb.inc.virtnbdbackup.1.data.chksum"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vda.full.data"]


def test_the_next_run_rolls_back_what_a_killed_run_left(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)
    write_set(target, ident="virtnbdbackup.0", level="full", chain="c1", files={"a.data": b"a"})
    killed = run_of(target, "virtnbdbackup.1")
    sink = killed.open_data("vda.inc.virtnbdbackup.1.data")
    sink.file.write(b"done")
    sink.commit()
    left = killed.open_data("vdb.inc.virtnbdbackup.1.data")
    left.file.write(b"half")
    left.file.flush()  # killed here: a .partial, a complete file, the journal
    assert read_state(target).uncommitted == {
        "vda.inc.virtnbdbackup.1.data",
        "vdb.inc.virtnbdbackup.1.data",
    }
    # Leftovers do not make a folder a set, nor do they block the next run.
    assert backup_set_files(tmp_path) == ["a.data"]

    retry = SetWriter(target, ident="virtnbdbackup.1", level="inc", chain="c1")
    assert retry.begin() == ["vda.inc.virtnbdbackup.1.data"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.data", "manifest.virtnbdbackup.0.json", "manifest.virtnbdbackup.1.pending"]
    assert roll_back(target) == []  # the retry's own journal names nothing yet


def test_a_committed_run_is_never_written_again(tmp_path: Path) -> None:
    target = DirectoryTarget(tmp_path)
    write_set(target, ident="virtnbdbackup.0", level="full", chain="c1", files={"a.data": b"a"})
    with pytest.raises(TargetError, match=re.escape("manifest.virtnbdbackup.0.json")):
        SetWriter(target, ident="virtnbdbackup.0", level="full", chain="c2").begin()


def test_write_set_copies_local_files_and_takes_all_back_on_failure(tmp_path: Path) -> None:
    source = tmp_path / "merged.data"
    source.write_bytes(DATA)
    target = MemoryTarget()
    manifest = write_set(
        target, ident="m1", level="full", chain="c1", files={"vda.full.data": str(source)}
    )
    assert manifest.files["vda.full.data"] == FileEntry(len(DATA), zlib.adler32(DATA))
    assert target.list() == ["manifest.m1.json", "vda.full.data"]

    other = MemoryTarget()
    with pytest.raises(TargetError, match=re.escape("missing.data")):
        write_set(
            other,
            ident="m2",
            level="full",
            chain="c1",
            files={"x.xml": b"x", "vda.full.data": str(tmp_path / "missing.data")},
        )
    assert other.list() == []


def test_a_damaged_manifest_is_an_error_naming_it() -> None:
    target = MemoryTarget()
    target.write(manifest_name("virtnbdbackup.0"), b'{"format": "virtnbdbackup-manifest"')
    with pytest.raises(StreamError, match=r"manifest.virtnbdbackup.0.json: manifest is damaged"):
        read_state(target)


def test_chain_identity_is_new_for_full_and_kept_for_inc(tmp_path: Path) -> None:
    first, new = chain_identity("full", tmp_path, "vm")
    assert new and len(first) == 32
    assert chain_identity("full", tmp_path, "vm")[0] != first
    (tmp_path / "vm.chain.json").write_text(
        json.dumps({"format": "virtnbdbackup-chain", "chain": first})
    )
    assert chain_identity("inc", tmp_path, "vm") == (first, False)
    assert chain_identity("inc", tmp_path / "other", "vm")[1]  # a set of 2.x: starts one
    (tmp_path / "vm.chain.json").write_text("{")
    with pytest.raises(StreamError, match=re.escape("vm.chain.json is damaged")):
        chain_identity("diff", tmp_path, "vm")


def test_an_inc_on_a_set_of_2x_adopts_its_files() -> None:
    target = MemoryTarget()
    target.write("vda.full.data", b"x")
    target.write("vda.full.data.chksum", b"12345")
    target.write("vdb.full.data", b"y")  # no checksum file
    names, sums = unlisted_data_files(target)
    assert names == ["vda.full.data", "vdb.full.data"]
    run = run_of(target, "virtnbdbackup.1")
    run.adopt(names, sums)
    manifest = run.commit()
    assert manifest.adopted == ("vda.full.data", "vdb.full.data")
    assert manifest.files["vda.full.data"] == FileEntry(None, 12345)
    assert unlisted_data_files(target) == ([], {})
