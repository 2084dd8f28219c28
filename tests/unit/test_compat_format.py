"""Bytes and metadata as virtnbdbackup 2.47 writes them."""

from __future__ import annotations

import io
import json
import os
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from libvirtnbdbackup.adapters.domainxml import Disk
from libvirtnbdbackup.adapters.virt import checkpoint_xml
from libvirtnbdbackup.errors import StreamError
from libvirtnbdbackup.format.frames import Kind
from libvirtnbdbackup.format.index import build_index
from libvirtnbdbackup.format.meta import StreamMeta
from libvirtnbdbackup.format.reader import StreamReader
from libvirtnbdbackup.format.writer import StreamWriter
from libvirtnbdbackup.format.zeros import zeros_of_index, zeros_path
from libvirtnbdbackup.targets.zipstream import ZipTarget

from .samples import sample_meta

# 2.47's dumpMetadata, key by key.
META_KEYS_247 = [
    "virtualSize",
    "dataSize",
    "date",
    "diskName",
    "diskFormat",
    "checkpointName",
    "compressed",
    "compressionMethod",
    "parentCheckpoint",
    "incremental",
    "streamVersion",
]


def test_meta_keys_are_in_247s_order() -> None:
    meta = StreamMeta(
        virtual_size=1 << 30,
        data_size=4096,
        disk_name="vda",
        disk_format="qcow2",
        checkpoint_name="virtnbdbackup.1",
        parent_checkpoint="virtnbdbackup.0",
        incremental=True,
        compressed=False,
        date="2026-12-01T10:00:00.000001",
    )
    assert list(meta.to_json()) == META_KEYS_247
    text = json.dumps(meta.to_json(), indent=4)
    assert [line.split('"')[1] for line in text.splitlines()[1:-1]] == META_KEYS_247


def test_zip_entries_are_regular_files_of_mode_644_with_real_dates(tmp_path: Path) -> None:
    source = tmp_path / "OVMF_VARS.fd"
    source.write_bytes(b"nvram")
    os.chmod(source, 0o600)
    stamp = time.mktime((2026, 3, 4, 5, 6, 8, 0, 0, -1))
    os.utime(source, (stamp, stamp))
    buf = io.BytesIO()
    target = ZipTarget(buf)
    entry = target.open_data("vda.full.data")
    entry.file.write(b"data")
    entry.commit()
    target.write("vmconfig.virtnbdbackup.0.xml", b"<domain/>")
    target.copy_file("OVMF_VARS.fd.virtnbdbackup.0", str(source))
    target.close()
    now = time.localtime()[:6]
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        assert zf.read("OVMF_VARS.fd.virtnbdbackup.0") == b"nvram"
    assert {name: info.external_attr >> 16 for name, info in infos.items()} == {
        name: 0o100644 for name in infos
    }
    for name in ("vda.full.data", "vmconfig.virtnbdbackup.0.xml"):
        assert infos[name].date_time[:3] == now[:3], name
    assert infos["OVMF_VARS.fd.virtnbdbackup.0"].date_time == (2026, 3, 4, 5, 6, 8)
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos.values())


def test_checkpoint_xml_carries_247s_description() -> None:
    disks = [Disk(target="vda", device="disk", source_type="file", format="qcow2", path="/x.qcow2")]
    root = ET.fromstring(checkpoint_xml("virtnbdbackup.0", disks, disks))
    assert [child.tag for child in root][:2] == ["description", "name"]
    assert root.findtext("description") == "Backup checkpoint"


def _inc_file(path: Path, fill: bytes = b"\x11") -> StreamWriter:
    meta = sample_meta(
        virtual_size=64 * 1024,
        data_size=4096,
        checkpoint_name="virtnbdbackup.1",
        parent_checkpoint="virtnbdbackup.0",
        incremental=True,
    )
    with open(path, "wb") as fh:
        writer = StreamWriter(fh, meta)
        writer.zero(0, 8192)
        writer.data(8192, 4096, [fill * 4096])
        writer.zero(16384, 4096)
        writer.finish()
    return writer


def test_incremental_zero_ranges_go_to_the_side_file_not_into_frames(tmp_path: Path) -> None:
    path = tmp_path / "vda.inc.virtnbdbackup.1.data"
    writer = _inc_file(path)
    assert writer.side_zeros == [(0, 8192), (16384, 4096)]
    with open(path, "rb") as fh:
        assert [f.kind for f in StreamReader(fh, path.name).frames()] == [Kind.DATA]
    index = writer.index(path.name)
    Path(zeros_path(str(path))).write_bytes(zeros_of_index(index))
    with open(path, "rb") as fh:
        built = build_index(fh, str(path))
    assert built == index
    assert [(e.start, e.length, e.is_zero) for e in built.extents] == [
        (0, 8192, True),
        (8192, 4096, False),
        (16384, 4096, True),
    ]


def test_a_side_file_of_another_data_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vda.inc.virtnbdbackup.1.data"
    index = _inc_file(path).index(path.name)
    Path(zeros_path(str(path))).write_bytes(zeros_of_index(index))
    _inc_file(path, b"\x22")  # replaced by another file of the same size
    with open(path, "rb") as fh, pytest.raises(StreamError, match="does not belong to"):
        build_index(fh, str(path))


def test_a_missing_side_file_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "vda.inc.virtnbdbackup.1.data"
    _inc_file(path)
    with open(path, "rb") as fh:
        built = build_index(fh, str(path))
    assert [e.is_zero for e in built.extents] == [False]
    assert any("has no .zeros side file" in r.message for r in caplog.records)
