"""Bytes and metadata as virtnbdbackup 2.47 writes them."""

from __future__ import annotations

import io
import json
import os
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from libvirtnbdbackup.adapters.domainxml import Disk
from libvirtnbdbackup.adapters.virt import checkpoint_xml
from libvirtnbdbackup.format.meta import StreamMeta
from libvirtnbdbackup.targets.zipstream import ZipTarget

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
