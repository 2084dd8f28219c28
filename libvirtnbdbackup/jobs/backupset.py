"""Reading a backup folder: its data files, their chains, their side files."""

from __future__ import annotations

import itertools
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.domainxml import boot_files, disk_sources
from ..errors import StreamError, TargetError
from ..format.checked import SetCheck, set_check
from ..format.meta import StreamMeta
from ..format.reader import is_stream_file, read_meta

PARTIAL_SUFFIX = ".partial"


def plain_name(name: str, what: str) -> str:
    """``name``, taken from a backup set, if it is safe as one file name.

    A set is data, possibly hostile: a disk name of ``../../etc/x`` or
    ``/tmp/x`` would put a restored image outside the output folder. One
    path component only, no NUL, and no leading dot (no ``..``, no hidden
    files); anything else refuses the whole set.
    """
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise StreamError(
            f"the backup set names {what} {name!r}, which is not a plain file name; "
            "refusing the set (it was damaged or made to write outside the output folder)"
        )
    return name


def inside(folder: Path, path: Path) -> Path:
    """``path``, if it is in ``folder`` also after following symlinks.

    Restore and map never read through a symlink that leads out of the
    backup folder (a loader linked to /etc/shadow would be copied out).
    """
    real = path.resolve()
    if not real.is_relative_to(folder.resolve()):
        raise TargetError(
            f"{path} is a symlink to {real}, outside the backup folder {folder}; "
            "refusing to read it"
        )
    return path


@dataclass(frozen=True)
class DataFile:
    path: Path
    disk: str
    meta: StreamMeta | None  # None for a raw image (no frames)
    chain: str | None = None  # identity of its chain, from its manifest

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ident(self) -> str:
        """The identifier of this backup in side-file names."""
        if self.meta is None or ".copy." in self.name:
            return "copy"
        for tag in (".diff.", ".inc."):  # <dev>.diff.<epoch>.data, <dev>.inc.<ident>.data
            if tag in self.name:
                return self.name.split(tag, 1)[1].removesuffix(".data")
        return self.meta.checkpoint_name


def scan(folder: str | Path, check: SetCheck | None = None) -> list[DataFile]:
    """Every committed data file in ``folder`` (see ``format/checked.py``)."""
    root = Path(folder)
    if not root.is_dir():
        raise TargetError(f"{root} is not a backup folder")
    check = check or set_check(root)
    names = check.usable([p.name for p in sorted(root.glob("*.data"))])
    return [data_file(inside(root, root / name), check.chain_of(name)) for name in names]


def data_file(path: Path, chain: str | None = None) -> DataFile:
    """A stream file with its meta, or a raw image (named ``<disk>.copy.data``)."""
    if is_stream_file(str(path)):
        meta = read_meta(str(path))
        disk = plain_name(meta.disk_name, f"in {path.name} the disk")
        return DataFile(path, disk, meta, chain)
    return DataFile(path, plain_name(path.name.split(".", 1)[0], "the disk"), None, chain)


def latest_config(folder: Path, sequences: list[list[DataFile]]) -> Path | None:
    """The domain XML saved with the newest backup of these chains."""
    for sequence in sequences:
        candidate = folder / f"vmconfig.{sequence[-1].ident}.xml"
        if candidate.exists():
            check_config(inside(folder, candidate))
            return candidate
    return None


def check_config(config: Path) -> str:
    """The text of a saved domain XML, if it can be read and parsed."""
    try:
        text = config.read_text()
        root = ET.fromstring(text)
    except OSError as err:
        raise TargetError(f"{config} cannot be read: {err.strerror or err}") from None
    except (ET.ParseError, UnicodeDecodeError) as err:
        raise StreamError(f"{config} is not a well-formed domain XML: {err}") from None
    if root.tag != "domain":
        raise StreamError(f"{config} is not a domain XML (its root is <{root.tag}>)")
    return text


@dataclass(frozen=True)
class Chain:
    """One disk's backups: full or copy, incrementals in order, differentials."""

    disk: str
    links: list[DataFile]  # base first, then each incremental on its parent
    diffs: list[DataFile]  # leaves: each holds all changes since its parent

    def sequence(self, until: str | None = None) -> list[DataFile]:
        """Files to apply for the newest state, or for checkpoint ``until``."""
        if until is None:
            last = self.links[-1]
            later = [d for d in self.diffs if _parent(d) == _checkpoint(last)]
            return self.links + later[-1:]
        for index, link in enumerate(self.links):  # the first file that reached it
            if _checkpoint(link) == until:
                return self.links[: index + 1]
        for diff in reversed(self.diffs):
            if _checkpoint(diff) == until:
                parent = [i for i, f in enumerate(self.links) if _checkpoint(f) == _parent(diff)]
                return [*self.links[: parent[-1] + 1], diff]
        known = sorted({_checkpoint(f) for f in self.links + self.diffs})
        raise StreamError(
            f"disk {self.disk}: no backup with checkpoint {until}; known: {', '.join(known)}"
        )


def _checkpoint(f: DataFile) -> str:
    return f.meta.checkpoint_name if f.meta else ""


def _parent(f: DataFile) -> str:
    return f.meta.parent_checkpoint if f.meta else ""


def _date(f: DataFile) -> str:
    return f.meta.date if f.meta else ""


def chains(files: list[DataFile]) -> dict[str, Chain]:
    """Per disk, the chain its files form, from the meta JSON alone.

    A chain starts at the disk's full or copy file and follows each
    incremental file whose parent is the checkpoint of the one before (an
    offline incremental, saved under its parent's name, comes right after
    its parent). Differential files hang off the checkpoint they were taken
    against. File times play no part.
    """
    by_disk: dict[str, list[DataFile]] = {}
    for f in files:
        by_disk.setdefault(f.disk, []).append(f)
    return {disk: _chain(disk, group) for disk, group in sorted(by_disk.items())}


def _chain(disk: str, group: list[DataFile]) -> Chain:
    bases = [f for f in group if f.meta is None or not f.meta.incremental]
    if len(bases) != 1:
        names = ", ".join(f.name for f in bases) or "none"
        raise StreamError(
            f"disk {disk}: a chain needs exactly one full or copy file, found {names}"
        )
    diffs = sorted((f for f in group if ".diff." in f.name), key=_date)
    incs = [f for f in group if f is not bases[0] and f not in diffs]
    links = [bases[0]]
    while incs:
        current = _checkpoint(links[-1])
        offline = sorted((f for f in incs if _parent(f) == _checkpoint(f) == current), key=_date)
        following = [f for f in incs if _parent(f) == current and f not in offline]
        if len(following) > 1:
            names = ", ".join(f.name for f in following)
            raise StreamError(
                f"disk {disk}: {names} all claim parent {current}; remove all but one"
            )
        if not offline and not following:
            names = ", ".join(f.name for f in incs)
            raise StreamError(
                f"disk {disk}: cannot place {names}: the chain ends at {links[-1].name} "
                f"(checkpoint {current}) and no file names it as parent; a link is missing"
            )
        for f in offline + following:
            links.append(f)
            incs.remove(f)
    for f in links + diffs:
        if f.chain != links[0].chain:
            raise StreamError(
                f"disk {disk}: {f.name} belongs to another chain than {links[0].name} "
                f"(chain {f.chain} against {links[0].chain}): refusing to apply it"
            )
    for diff in diffs:
        if _parent(diff) not in {_checkpoint(f) for f in links}:
            raise StreamError(
                f"disk {disk}: {diff.name} builds on checkpoint {_parent(diff)}, "
                "which no file of the chain holds"
            )
    return Chain(disk, links, diffs)


def ordered_sequence(files: list[DataFile], option: str = "--sequence") -> list[DataFile]:
    """Files given in chain order (``option`` names them in messages), checked link by link."""
    first = files[0]
    if first.meta is not None and first.meta.incremental:
        raise StreamError(f"{option} must start with a full or copy file, not {first.name}")
    for before, after in itertools.pairwise(files):
        if after.meta is None or after.disk != first.disk:
            raise StreamError(
                f"{option}: {after.name} is not an incremental file of disk {first.disk}"
            )
        if _parent(after) != _checkpoint(before):
            raise StreamError(
                f"{option}: {after.name} builds on checkpoint {_parent(after)}, but "
                f"{before.name} holds {_checkpoint(before)}"
            )
        if after.chain != first.chain:
            raise StreamError(
                f"{option}: {after.name} belongs to another chain than {first.name} "
                f"(chain {after.chain} against {first.chain})"
            )
    return files


def config_ident(config: Path) -> str:
    return config.name.removeprefix("vmconfig.").removesuffix(".xml")


def saved_boot_files(config: Path) -> dict[str, Path]:
    """Loader, NVRAM, kernel and initrd of a saved domain XML -> their saved copies."""
    ident = config_ident(config)
    found = {}
    for path in boot_files(config.read_text()):
        base = plain_name(os.path.basename(path), "the boot file")
        for saved in (config.parent / f"{base}.{ident}", config.parent / base):
            if saved.is_file():
                found[path] = inside(config.parent, saved)
                break
    return found


def load_json(path: Path) -> Any:
    """The JSON side file at ``path`` (in a backup folder), None when missing or unreadable."""
    if path.is_file():
        inside(path.parent, path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def image_names(config: Path | None, disks: list[str]) -> dict[str, str]:
    """File name of each restored disk: the source image's name when known."""
    sources: dict[str, str] = {}
    if config is not None and config.is_file():
        sources = disk_sources(config.read_text())
    names: dict[str, str] = {}
    used: set[str] = set()
    for disk in disks:
        name = os.path.basename(sources.get(disk, "")) or disk
        plain_name(name, f"for disk {disk} the image")
        if name in used:
            name = f"{disk}.{name}"
        used.add(name)
        names[disk] = name
    return names
