"""The JSON carried by a stream's ``meta`` frame."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import StreamError
from .frames import COMPRESSION_METHOD, STREAM_VERSION

# False, or the lz4 level (0 included: anything but False means compressed).
Compression = bool | int


@dataclass(frozen=True)
class StreamMeta:
    virtual_size: int
    data_size: int
    disk_name: str
    disk_format: str
    checkpoint_name: str
    parent_checkpoint: str
    incremental: bool
    compressed: Compression
    date: str = ""
    stream_version: int = STREAM_VERSION

    @property
    def is_compressed(self) -> bool:
        return self.compressed is not False

    def to_json(self) -> dict[str, Any]:
        # Keys in the order 2.47 writes them: its files and ours differ in no byte
        # but the date.
        return {
            "virtualSize": self.virtual_size,
            "dataSize": self.data_size,
            "date": self.date or datetime.now().isoformat(timespec="microseconds"),
            "diskName": self.disk_name,
            "diskFormat": self.disk_format,
            "checkpointName": self.checkpoint_name,
            "compressed": self.compressed,
            "compressionMethod": COMPRESSION_METHOD,
            "parentCheckpoint": self.parent_checkpoint,
            "incremental": self.incremental,
            "streamVersion": self.stream_version,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> StreamMeta:
        if not isinstance(doc, dict):
            raise StreamError(f"{where}: meta frame is not a JSON object")
        try:
            compressed = doc.get("compressed", False)
            if compressed is True:  # some writers store true for "level 0"
                compressed = 0
            elif compressed is not False and not isinstance(compressed, int):
                raise ValueError(f"'compressed' must be false or an integer, not {compressed!r}")
            return cls(
                virtual_size=int(doc["virtualSize"]),
                data_size=int(doc["dataSize"]),
                disk_name=str(doc["diskName"]),
                disk_format=str(doc.get("diskFormat", "qcow2")),
                checkpoint_name=str(doc.get("checkpointName") or ""),
                parent_checkpoint=str(doc.get("parentCheckpoint") or ""),
                incremental=bool(doc.get("incremental", False)),
                compressed=compressed,
                date=str(doc.get("date", "")),
                stream_version=int(doc.get("streamVersion") or doc.get("stream-version") or 1),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise StreamError(f"{where}: meta frame lacks or mangles {err}") from None
