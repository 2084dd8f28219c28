"""The checked reader: what every consumer of a backup set trusts, and how.

Restore, verify, map (and its nbdkit plugin), dump and merge read a set
through these pieces; none takes a byte of a set for granted:

- :func:`set_check` reads the set's manifests (``format/manifest.py``) once
  and says which data files are committed: in a set that has manifests a
  data file no manifest lists, a listed file that is missing or of another
  size, and the files of one disk that belong to different chains are
  errors; what a killed run left (its journal names it) is skipped with a
  warning. A set without manifests (virtnbdbackup 2.x) is taken as it is,
  with a warning that only its ``.chksum`` files check it.
- A file whose name says stream is a stream (``reader.is_stream_file``):
  any damage to its frames is a :class:`StreamError` naming file and offset.
- The ``.idx`` side file is used only when it is bound to its data file
  (``index.load_index``); else it is rebuilt from the frame headers.
- :class:`Ledger` checks a file's Adler-32 while it is read: a reader adds
  every range it reads (in any order, from any thread); ``verify()`` reads
  only the ranges nobody read, joins the sums in file order and compares
  the result with the ``.chksum`` file and the manifest. Each byte is read
  once. A restore calls it before it commits the image.

Interface (kept small on purpose)::

    check = set_check(folder)          # SetCheck
    check.usable(names) -> names       # committed data files (raises, or skips killed runs;
                                       # incs 2.x added after our last run: a warning)
    check.chain_of(name) -> str | None # chain identity of a committed file
    check.expected(name) -> Expected   # size and Adler-32 that a file must have
    ledger = Ledger(path, check.expected(name))
    ledger.add(offset, data)           # each range read
    ledger.verify()                    # raises StreamError on any mismatch
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StreamError
from ..targets.directory import DirectoryTarget
from .checksum import adler32
from .index import saved_checksum
from .manifest import SetState, read_state
from .reader import adler32_concat

log = logging.getLogger(__name__)

GAP_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Expected:
    """What a data file must be, from its ``.chksum`` and its manifest."""

    name: str
    size: int | None
    adler32: int | None
    source: str  # where adler32 comes from, for messages

    @property
    def checked(self) -> bool:
        return self.adler32 is not None


@dataclass
class SetCheck:
    folder: Path
    state: SetState
    from_2x: set[str] = field(default_factory=set)  # incs 2.x added, taken by usable()

    @property
    def has_manifests(self) -> bool:
        return bool(self.state.manifests)

    def usable(self, names: list[str], *, accept_2x: bool = True) -> list[str]:
        """The committed data files among ``names`` (the set's ``*.data``).

        With ``accept_2x``, an incremental file that virtnbdbackup 2.x added
        after this tool's last run is taken too, with a warning.
        """
        if not self.has_manifests:
            if names:
                log.warning(
                    "%s has no manifest (a set of virtnbdbackup 2.x): its data files are "
                    "checked against their .chksum files only, a missing disk or a file "
                    "of another chain cannot be told",
                    self.folder,
                )
            return names
        listed = self.state.listed
        uncommitted = self.state.uncommitted
        present = set(names)
        for manifest in sorted(self.state.manifests.values(), key=lambda m: m.ident):
            for name in manifest.data_files:
                if name not in present:
                    raise StreamError(
                        f"{self.folder}: the backup {manifest.ident} wrote {name}, which is "
                        "missing: the set is incomplete (restore from another set, or with "
                        "--until a point before it)"
                    )
        usable = []
        for name in names:
            if name in listed:
                self._check_size(name)
                usable.append(name)
            elif name in uncommitted:
                log.warning(
                    "ignoring %s: written by a backup that never completed (the next backup "
                    "into this folder removes it)",
                    name,
                )
            elif accept_2x and self.continues_as_2x(name):
                log.warning(
                    "%s is listed in no manifest: an incremental backup of virtnbdbackup 2.x "
                    "that continues this chain (its checkpoint follows the committed ones in "
                    "the .cpt file); it is checked against its .chksum only",
                    name,
                )
                self.from_2x.add(name)
                usable.append(name)
            else:
                raise StreamError(
                    f"{self.folder / name} is listed in no manifest of this set: no completed "
                    "backup of this chain wrote it (a file of another chain or tool, or one "
                    "copied in); move it out of the folder"
                )
        return usable

    def continues_as_2x(self, name: str) -> bool:
        """An inc that virtnbdbackup 2.x added after this tool's last run.

        2.x writes no manifest, but it records each checkpoint it creates in
        ``<domain>.cpt`` and ``checkpoints/<name>.xml``. Such a file is taken
        when its checkpoint comes after every checkpoint a manifest commits.
        """
        dev_and_rest = name.split(".inc.", 1)
        if len(dev_and_rest) != 2 or not dev_and_rest[1].endswith(".data"):
            return False
        checkpoint = dev_and_rest[1].removesuffix(".data")
        chain = self._cpt_chain()
        saved_xml = self.folder / "checkpoints" / f"{checkpoint}.xml"
        if checkpoint not in chain or not saved_xml.is_file():
            return False
        position = chain.index(checkpoint)
        committed = [m.ident for m in self.state.manifests.values() if m.ident in chain]
        return bool(committed) and all(chain.index(c) < position for c in committed)

    def _cpt_chain(self) -> list[str]:
        cpt_files = sorted(self.folder.glob("*.cpt"))
        if len(cpt_files) != 1:
            return []
        try:
            chain = json.loads(cpt_files[0].read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            return []
        return chain

    def _check_size(self, name: str) -> None:
        entry = self.state.listed[name].files[name]
        size = (self.folder / name).stat().st_size
        if entry.size is not None and size != entry.size:
            raise StreamError(
                f"{self.folder / name} has {size} bytes, its manifest says {entry.size} "
                "(the file is truncated or was replaced)"
            )

    def chain_of(self, name: str) -> str | None:
        manifest = self.state.listed.get(name)
        if manifest is None and name in self.from_2x:  # it continues the newest committed run
            chain = self._cpt_chain()
            runs = [m for m in self.state.manifests.values() if m.ident in chain]
            manifest = max(runs, key=lambda m: chain.index(m.ident))
        return manifest.chain if manifest is not None else None

    def expected(self, path: Path) -> Expected:
        name = path.name
        saved = saved_checksum(str(path))
        if saved is None and os.path.exists(str(path) + ".chksum"):
            raise StreamError(f"{path}.chksum: not a checksum")
        manifest = self.state.listed.get(name)
        entry = manifest.files[name] if manifest is not None else None
        listed = entry.adler32 if entry is not None else None
        if None not in (saved, listed) and saved != listed:
            raise StreamError(
                f"{path}.chksum says {saved}, the manifest {listed}: one of them is damaged"
            )
        value = saved if saved is not None else listed
        source = f"{name}.chksum" if saved is not None else "its manifest"
        return Expected(name, entry.size if entry else None, value, source)


def set_check(folder: str | Path) -> SetCheck:
    root = Path(folder)
    return SetCheck(root, read_state(DirectoryTarget(root)))


def check_chain(check: SetCheck, disk: str, names: list[str]) -> None:
    """All files of one disk's chain belong to the same chain."""
    chains = {name: check.chain_of(name) for name in names}
    base = chains[names[0]]
    for name, chain in chains.items():
        if chain != base:
            raise StreamError(
                f"disk {disk}: {name} belongs to another chain than {names[0]} "
                f"({chain} against {base}): refusing to apply it"
            )


class Ledger:
    """The Adler-32 of one data file, from the ranges its reader reads."""

    def __init__(self, path: Path, expected: Expected) -> None:
        self.path = path
        self.expected = expected
        self._parts: list[tuple[int, int, int]] = []  # (offset, length, adler32)
        self._lock = threading.Lock()

    def add(self, offset: int, data: bytes | memoryview) -> None:
        value = adler32(data)
        with self._lock:
            self._parts.append((offset, len(data), value))

    def verify(self, fd: int) -> int:
        """Read what nobody read, compare the whole file's Adler-32; return it."""
        size = os.fstat(fd).st_size
        if self.expected.size is not None and size != self.expected.size:
            raise StreamError(
                f"{self.path} has {size} bytes, its manifest says {self.expected.size}"
            )
        value, position = 1, 0
        for offset, length, part in sorted(self._parts):
            if offset < position:
                raise StreamError(
                    f"{self.path} at offset {offset}: the index points twice into these bytes "
                    "(it is damaged)"
                )
            if offset > position:
                value = adler32_concat(value, *self._gap(fd, position, offset))
            value = adler32_concat(value, part, length)
            position = offset + length
        if position < size:
            value = adler32_concat(value, *self._gap(fd, position, size))
        if self.expected.checked and value != self.expected.adler32:
            raise StreamError(
                f"{self.path}: checksum {value} does not match {self.expected.adler32} of "
                f"{self.expected.source}: the file is damaged"
            )
        return value

    def _gap(self, fd: int, start: int, end: int) -> tuple[int, int]:
        value = 1
        position = start
        while position < end:
            chunk = os.pread(fd, min(GAP_CHUNK, end - position), position)
            if not chunk:
                raise StreamError(f"{self.path} at offset {position}: file ends early")
            value = adler32(chunk, value)
            position += len(chunk)
        return value, end - start
