"""Reading a backup folder: its data files, their chains, their side files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.domainxml import disk_sources
from ..errors import StreamError, TargetError
from ..format.meta import StreamMeta
from ..format.reader import is_stream_file, read_meta

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class DataFile:
    path: Path
    disk: str
    meta: StreamMeta | None  # None for a raw image (no frames)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ident(self) -> str:
        """The identifier of this backup in side-file names."""
        if self.meta is None or ".copy." in self.name:
            return "copy"
        return self.meta.checkpoint_name


def scan(folder: str | Path) -> list[DataFile]:
    """Every complete data file in ``folder``; a stale ``.partial`` is refused."""
    root = Path(folder)
    if not root.is_dir():
        raise TargetError(f"{root} is not a backup folder")
    files = []
    for path in sorted(root.glob("*.data")):
        if is_stream_file(str(path)):
            meta = read_meta(str(path))
            files.append(DataFile(path, meta.disk_name, meta))
        else:
            files.append(DataFile(path, path.name.split(".", 1)[0], None))
    return files


def chains(files: list[DataFile]) -> dict[str, list[DataFile]]:
    """Per disk, its files in the order they must be applied.

    A chain starts at the disk's full or copy file and follows each
    incremental file whose parent is the checkpoint of the one before; the
    order comes from the meta JSON, never from file times.
    """
    by_disk: dict[str, list[DataFile]] = {}
    for f in files:
        by_disk.setdefault(f.disk, []).append(f)
    result = {}
    for disk, group in sorted(by_disk.items()):
        bases = [f for f in group if f.meta is None or not f.meta.incremental]
        if len(bases) != 1:
            names = ", ".join(f.name for f in bases) or "none"
            raise StreamError(
                f"disk {disk}: a chain needs exactly one full or copy file, found {names}"
            )
        chain = [bases[0]]
        rest = [f for f in group if f is not bases[0]]
        while rest:
            last = chain[-1].meta
            assert last is not None
            following = [
                f for f in rest if f.meta and f.meta.parent_checkpoint == last.checkpoint_name
            ]
            if len(following) != 1:
                names = ", ".join(f.name for f in rest)
                raise StreamError(
                    f"disk {disk}: cannot place {names} after {chain[-1].name} "
                    f"(checkpoint {last.checkpoint_name}): "
                    + ("no file names it as parent" if not following else "several files do")
                )
            chain.append(following[0])
            rest.remove(following[0])
        result[disk] = chain
    return result


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def image_names(folder: Path, config: Path | None, disks: list[str]) -> dict[str, str]:
    """File name of each restored disk: the source image's name when known."""
    sources: dict[str, str] = {}
    if config is not None and config.is_file():
        sources = disk_sources(config.read_text())
    names: dict[str, str] = {}
    used: set[str] = set()
    for disk in disks:
        name = os.path.basename(sources.get(disk, "")) or disk
        if name in used:
            name = f"{disk}.{name}"
        used.add(name)
        names[disk] = name
    return names
