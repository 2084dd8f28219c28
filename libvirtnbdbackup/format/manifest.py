"""The commit point of a backup run: its manifest, and the journal before it.

Each run writes ``manifest.<ident>.json`` last, atomically: the files of
that run with their size and Adler-32, and the identity of the chain they
belong to. A run becomes visible as a whole when its manifest exists, or
not at all. Before writing its first file a run records in
``manifest.<ident>.pending`` every name it is about to create (updated
before each new one), so that whatever a killed run left is known and can
be taken back by the next run (:func:`roll_back`) or skipped by a restore.
virtnbdbackup 2.x ignores both files.

Usage, from any job that writes a set (a backup, a merge)::

    run = SetWriter(target, ident="virtnbdbackup.3", level="inc", chain=chain_id)
    run.begin()            # rolls back killed runs, writes the journal
    run.write(name, data)  # or run.open_data(name) / run.copy(name, path)
    run.commit()           # the manifest: now the run is part of the set
    # on failure: run.abort() removes what the run wrote

:func:`write_set` does all of it in one call for files already in memory
or on local disk.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..errors import StreamError, TargetError
from ..targets.base import DataSink, Target
from .checksum import adler32

MANIFEST_FORMAT = "virtnbdbackup-manifest"
MANIFEST_VERSION = 1
MANIFEST_PREFIX = "manifest."
MANIFEST_SUFFIX = ".json"
PENDING_SUFFIX = ".pending"
COPY_CHUNK = 1024 * 1024
CHAIN_FORMAT = "virtnbdbackup-chain"
CHECKSUM_SUFFIX = ".chksum"


def manifest_name(ident: str) -> str:
    return f"{MANIFEST_PREFIX}{ident}{MANIFEST_SUFFIX}"


def pending_name(ident: str) -> str:
    return f"{MANIFEST_PREFIX}{ident}{PENDING_SUFFIX}"


def new_chain_id() -> str:
    return uuid.uuid4().hex


def chain_file_name(domain: str) -> str:
    """``<domain>.chain.json``: the identity of the chain, next to ``<domain>.cpt``."""
    return f"{domain}.chain.json"


def chain_file_bytes(chain: str) -> bytes:
    return json.dumps({"format": CHAIN_FORMAT, "chain": chain}).encode()


def read_chain_id(path: Path) -> str | None:
    """The identity in a chain file; None when it is missing (a set of 2.x)."""
    try:
        doc = json.loads(path.read_bytes())
        chain = doc["chain"] if doc.get("format") == CHAIN_FORMAT else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as err:
        raise StreamError(f"{path} is damaged ({err}); start a new chain with -l full") from None
    if not isinstance(chain, str) or not chain:
        raise StreamError(f"{path} holds no chain identity; start a new chain with -l full")
    return chain


def chain_identity(level: str, meta_dir: Path, domain: str) -> tuple[str, bool]:
    """The chain a backup at ``level`` belongs to, and whether it is new.

    Full and copy backups start a chain; the others continue the one in
    ``<domain>.chain.json``, or, in a set of 2.x that has none, start
    recording one.
    """
    if level in ("full", "copy"):
        return new_chain_id(), True
    chain = read_chain_id(meta_dir / chain_file_name(domain))
    if chain is None:
        return new_chain_id(), True
    return chain, False


def unlisted_data_files(target: Target) -> tuple[list[str], dict[str, int | None]]:
    """Data files no manifest lists (a set of 2.x), with their saved checksums."""
    state = read_state(target)
    listed = state.listed
    uncommitted = state.uncommitted
    present = target.list()
    names = [
        n
        for n in present
        if n.endswith(".data") and "/" not in n and n not in listed and n not in uncommitted
    ]
    checksums: dict[str, int | None] = {}
    for name in names:
        checksums[name] = None
        if name + CHECKSUM_SUFFIX in present:
            # A damaged checksum file stays unsummed here; a restore reports it.
            with contextlib.suppress(ValueError):
                checksums[name] = int(target.read(name + CHECKSUM_SUFFIX).strip())
    return names, checksums


@dataclass(frozen=True)
class FileEntry:
    size: int | None  # None: not known (a file this run adopted, see SetWriter.adopt)
    adler32: int | None  # None: not summed (raw images, which 2.x does not sum either)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "adler32": self.adler32}


@dataclass(frozen=True)
class Manifest:
    ident: str
    level: str
    chain: str
    files: dict[str, FileEntry]
    date: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))
    adopted: tuple[str, ...] = ()  # files of an earlier run without a manifest (2.x)

    @property
    def name(self) -> str:
        return manifest_name(self.ident)

    @property
    def data_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".data"))

    def to_bytes(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "ident": self.ident,
            "level": self.level,
            "chain": self.chain,
            "date": self.date,
            "files": {n: e.to_json() for n, e in sorted(self.files.items())},
            "adopted": list(self.adopted),
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("format") != MANIFEST_FORMAT or doc.get("version") != MANIFEST_VERSION:
                raise ValueError("unknown manifest format or version")
            files = {
                str(n): FileEntry(_opt_int(e["size"]), _opt_int(e["adler32"]))
                for n, e in doc["files"].items()
            }
            return cls(
                ident=str(doc["ident"]),
                level=str(doc["level"]),
                chain=str(doc["chain"]),
                files=files,
                date=str(doc.get("date", "")),
                adopted=tuple(str(n) for n in doc.get("adopted", [])),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise StreamError(f"{where}: manifest is damaged: {err}") from None


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a size or checksum: {value!r}")
    return value


@dataclass(frozen=True)
class Journal:
    ident: str
    names: list[str]

    def to_bytes(self) -> bytes:
        doc = {"format": MANIFEST_FORMAT, "pending": self.ident, "files": self.names}
        return json.dumps(doc).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, ident: str) -> Journal:
        try:
            names = json.loads(raw)["files"]
            if not isinstance(names, list):
                raise ValueError("files is not a list")
            return cls(ident, [str(n) for n in names])
        except (KeyError, TypeError, ValueError):
            # A journal is only written before the files it names: a damaged
            # one names nothing that exists yet (beyond its own name).
            return cls(ident, [])


@dataclass(frozen=True)
class SetState:
    """The committed runs of a set, and those a killed run left pending."""

    manifests: dict[str, Manifest]  # ident -> manifest
    pending: dict[str, Journal]  # ident -> journal of a run without a manifest

    @property
    def listed(self) -> dict[str, Manifest]:
        """File name -> the manifest that lists it."""
        return {name: m for m in self.manifests.values() for name in m.files}

    @property
    def uncommitted(self) -> set[str]:
        """Files named by the journal of a run that never committed."""
        listed = self.listed
        return {n for j in self.pending.values() for n in j.names if n not in listed}


def read_state(target: Target) -> SetState:
    manifests: dict[str, Manifest] = {}
    journals: dict[str, Journal] = {}
    for name in target.list():
        if "/" in name or not name.startswith(MANIFEST_PREFIX):
            continue
        ident = name[len(MANIFEST_PREFIX) :]
        if ident.endswith(MANIFEST_SUFFIX):
            manifest = Manifest.from_bytes(target.read(name), name)
            manifests[manifest.ident] = manifest
        elif ident.endswith(PENDING_SUFFIX):
            ident = ident.removesuffix(PENDING_SUFFIX)
            journals[ident] = Journal.from_bytes(target.read(name), ident)
    pending = {i: j for i, j in journals.items() if i not in manifests}
    return SetState(manifests, pending)


def roll_back(target: Target) -> list[str]:
    """Remove what killed runs left (files their journals name that no
    manifest lists, then the journals); the names removed."""
    if target.streamed:
        return []
    state = read_state(target)
    removed = []
    listed = state.listed
    present = set(target.list())
    for ident, journal in sorted(state.pending.items()):
        for name in journal.names:
            if name not in listed:
                if name in present:
                    removed.append(name)
                target.remove(name)
        target.remove(pending_name(ident))
    return removed


class _SummingFile:
    """A file object that keeps the size and Adler-32 of what is written to
    it in order; a seek away from the end drops the sum (raw images)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.size = 0
        self.position = 0
        self.adler32: int | None = 1

    def write(self, data: Any) -> int:
        count = self._raw.write(data) or 0
        if self.adler32 is not None:
            self.adler32 = adler32(data, self.adler32)
        self.position += count
        self.size = max(self.size, self.position)
        return count

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._raw.seek(offset, whence)
        if position != self.position:
            self.adler32 = None
        self.position = position
        return position

    def tell(self) -> int:
        return self.position

    def truncate(self, size: int | None = None) -> int:
        size = self._raw.truncate(size)
        if size != self.size:
            self.adler32 = None
        self.size = size
        return size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _RecordedSink:
    def __init__(self, run: SetWriter, name: str, sink: DataSink) -> None:
        self.name = name
        self._run = run
        self._sink = sink
        self._file = _SummingFile(sink.file)

    @property
    def file(self) -> BinaryIO:
        return cast(BinaryIO, self._file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)  # e.g. the .partial path, for messages

    def commit(self) -> None:
        self._sink.commit()
        self._run.record(self.name, FileEntry(self._file.size, self._file.adler32))

    def abort(self) -> None:
        self._sink.abort()


class SetWriter:
    """The files of one run, made part of the set by one commit.

    It offers the writing half of :class:`Target` (``write``, ``open_data``)
    and records each file; jobs write through it, never to the target
    beside it. Several threads may write through one run at once.
    """

    def __init__(self, target: Target, *, ident: str, level: str, chain: str) -> None:
        self.target = target
        self.streamed = target.streamed
        self.ident = ident
        self.level = level
        self.chain = chain
        self.files: dict[str, FileEntry] = {}
        self._planned: list[str] = []
        self._adopted: dict[str, FileEntry] = {}
        self._committed = False
        self._lock = threading.Lock()  # disks are written by several threads

    def begin(self) -> list[str]:
        """Take back what killed runs left, and start this run's journal;
        the names rolled back."""
        removed = roll_back(self.target)
        if manifest_name(self.ident) in self.target.list():
            raise TargetError(
                f"the set holds a committed backup {self.ident} already "
                f"({manifest_name(self.ident)}); refusing to write it again"
            )
        self._journal([])
        return removed

    def adopt(self, names: Iterable[str], checksums: Mapping[str, int | None]) -> None:
        """List files of earlier runs that have no manifest (written by 2.x)
        in this run's manifest, so a restore takes them as part of the chain."""
        for name in names:
            self._adopted[name] = FileEntry(None, checksums.get(name))

    def _journal(self, names: list[str]) -> None:
        if self.streamed:
            return
        self._planned = names
        self.target.write(pending_name(self.ident), Journal(self.ident, names).to_bytes())

    def _plan(self, name: str) -> None:
        with self._lock:
            if name not in self._planned:
                self._journal([*self._planned, name])

    def record(self, name: str, entry: FileEntry) -> None:
        with self._lock:
            self.files[name] = entry

    def write(self, name: str, data: bytes) -> None:
        self._plan(name)
        self.target.write(name, data)
        self.record(name, FileEntry(len(data), adler32(data)))

    def open_data(self, name: str) -> DataSink:
        self._plan(name)
        return _RecordedSink(self, name, self.target.open_data(name))

    def copy(self, name: str, source: str) -> None:
        """Store a small local file (a boot file): read once more to sum it."""
        self._plan(name)
        self.target.copy_file(name, source)
        size, value = 0, 1
        try:
            with open(source, "rb") as src:
                while chunk := src.read(COPY_CHUNK):
                    size += len(chunk)
                    value = adler32(chunk, value)
        except OSError as err:
            raise TargetError(f"cannot read {source}: {err.strerror}") from None
        self.record(name, FileEntry(size, value))

    def manifest(self) -> Manifest:
        files = {**self._adopted, **self.files}
        return Manifest(self.ident, self.level, self.chain, files, adopted=tuple(self._adopted))

    def commit(self) -> Manifest:
        """The commit point: the manifest, written last."""
        manifest = self.manifest()
        self.target.commit(manifest.name, manifest.to_bytes(), replaces=pending_name(self.ident))
        self._committed = True
        return manifest

    def abort(self) -> list[str]:
        """Take back every file of this uncommitted run (a failed backup);
        the names removed. A streamed target keeps them: its archive is
        then never completed."""
        if self._committed or self.streamed:
            return []
        removed = []
        for name in self._planned:
            # What cannot be removed stays in the journal: the next run takes it back.
            with contextlib.suppress(TargetError):
                self.target.remove(name)
                if name in self.files:
                    removed.append(name)
        with contextlib.suppress(TargetError):
            self.target.remove(pending_name(self.ident))
        return removed


def write_set(
    target: Target,
    *,
    ident: str,
    level: str,
    chain: str,
    files: Mapping[str, bytes | str],
) -> Manifest:
    """Write a whole run in one call: ``files`` maps names to their bytes,
    or to the path of a local file to copy; commits, or takes all back."""
    run = SetWriter(target, ident=ident, level=level, chain=chain)
    run.begin()
    try:
        for name, content in files.items():
            if isinstance(content, str):
                run.copy(name, content)
            else:
                run.write(name, content)
        return run.commit()
    except BaseException:
        run.abort()
        raise
