"""What a prune does: the backup points of a folder (or of a root of folders),
and for each one whether it is kept, merged into a new full, or removed.

A point is one backup run: the data files of all its disks that share an
identifier (``virtnbdbackup.N`` for full and inc, the epoch for diff). In
one folder the full and incrementals form a chain of links; a
differential hangs off one link. Keeping a point keeps every link up to
it (or up to its differential's parent); links older than the oldest one
kept are merged forward into a synthetic full at that link; points that
nothing kept depends on are removed. The last link of a chain stays
while anything of the folder stays: the next incremental backup builds
on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..errors import StreamError, UsageError
from .backupset import DataFile, chains, scan
from .keeprules import Dated, KeepRules, select

log = logging.getLogger(__name__)

PROTECT_SUFFIX = ".protect"
WORK_DIR = ".virtnbdprune"
KEEP, MERGE, REMOVE = "keep", "merge", "remove"


@dataclass(frozen=True)
class Point:
    folder: Path
    ident: str
    level: str  # full, copy, inc or diff
    checkpoint: str
    parent: str
    time: datetime
    files: tuple[DataFile, ...]  # one per disk
    protected: bool

    @property
    def key(self) -> tuple[str, str]:
        return (str(self.folder), self.ident)


@dataclass
class Row:
    point: Point
    action: str  # keep, merge or remove
    reason: str


@dataclass
class FolderPlan:
    folder: Path
    domain: str | None  # from <domain>.cpt
    links: list[Point]
    diffs: list[Point]
    rows: list[Row] = field(default_factory=list)
    pending: bool = False  # an interrupted prune is to be finished first

    @property
    def merged(self) -> list[Point]:
        """Links folded into the new full, oldest first."""
        return [r.point for r in self.rows if r.action == MERGE]

    @property
    def new_base(self) -> Point | None:
        """The link that becomes the synthetic full (None: no merge)."""
        if not self.merged:
            return None
        return self.links[len(self.merged)]

    @property
    def removed(self) -> list[Point]:
        return [r.point for r in self.rows if r.action == REMOVE]

    @property
    def remove_all(self) -> bool:
        return bool(self.rows) and all(r.action == REMOVE for r in self.rows)

    @property
    def changes(self) -> bool:
        return any(r.action != KEEP for r in self.rows)


@dataclass
class PrunePlan:
    root: Path
    rules: KeepRules
    folders: list[FolderPlan]

    @property
    def rows(self) -> list[Row]:
        return [r for f in self.folders for r in f.rows]

    def table(self) -> str:
        header = ("FOLDER", "POINT", "LEVEL", "DATE", "ACTION", "REASON")
        lines = [header]
        for f in self.folders:
            name = os.path.relpath(f.folder, self.root) if f.folder != self.root else "."
            if f.pending:
                lines.append((name, "-", "-", "-", "finish", "an interrupted prune is pending"))
            for r in f.rows:
                p = r.point
                date = p.time.strftime("%Y-%m-%d %H:%M")
                lines.append((name, p.ident, p.level, date, r.action, r.reason))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )


def backup_folders(root: Path) -> list[Path]:
    """``root`` itself when it holds a backup set, else its subfolders that do."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    if _holds_set(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and _holds_set(p))
    if not found:
        raise UsageError(f"{root} holds no backup set, nor do its subfolders")
    return found


def _holds_set(folder: Path) -> bool:
    return any(folder.glob("*.data")) or (folder / WORK_DIR).is_dir()


def _level(f: DataFile) -> str:
    if f.meta is None or ".copy." in f.name:
        return "copy"
    if ".diff." in f.name:
        return "diff"
    return "inc" if f.meta.incremental else "full"


def _time(f: DataFile) -> datetime:
    if f.meta is not None and f.meta.date:
        try:
            return datetime.fromisoformat(f.meta.date)
        except ValueError:
            log.warning("%s: date %r not understood; using the file time", f.path, f.meta.date)
    return datetime.fromtimestamp(f.path.stat().st_mtime)


def _point(folder: Path, files: list[DataFile]) -> Point:
    first = files[0]
    return Point(
        folder=folder,
        ident=first.ident,
        level=_level(first),
        checkpoint=first.meta.checkpoint_name if first.meta else "",
        parent=first.meta.parent_checkpoint if first.meta else "",
        time=_time(first),
        files=tuple(files),
        protected=(folder / f"{first.ident}{PROTECT_SUFFIX}").exists(),
    )


def read_folder(folder: Path) -> FolderPlan:
    """The points of one backup folder, links in chain order."""
    cpt = sorted(folder.glob("*.cpt"))
    domain = cpt[0].stem if len(cpt) == 1 else None
    files = scan(folder)
    streams = [f for f in files if f.meta is not None]
    raw = [f for f in files if f.meta is None]
    if not streams:
        # Raw images only (-t raw, or a copy of raw disks): one point.
        return FolderPlan(folder, domain, [_point(folder, raw)] if raw else [], [])
    per_disk = chains(streams)
    disks = sorted(per_disk)
    first = per_disk[disks[0]]
    link_idents = [f.ident for f in first.links]
    diff_idents = [f.ident for f in first.diffs]
    for disk in disks[1:]:
        chain = per_disk[disk]
        if [f.ident for f in chain.links] != link_idents or sorted(
            f.ident for f in chain.diffs
        ) != sorted(diff_idents):
            raise StreamError(
                f"{folder}: disk {disk} has other backups than disk {disks[0]}; prune works "
                "on folders whose disks were backed up together"
            )

    def files_of(ident: str) -> list[DataFile]:
        found = [
            f for d in disks for f in per_disk[d].links + per_disk[d].diffs if f.ident == ident
        ]
        # Raw disks saved as copies with the full backup belong to it.
        return found + (raw if ident == link_idents[0] else [])

    links = [_point(folder, files_of(i)) for i in link_idents]
    diffs = [_point(folder, files_of(i)) for i in diff_idents]
    return FolderPlan(folder, domain, links, diffs)


def plan_prune(root: str | Path, rules: KeepRules) -> PrunePlan:
    root = Path(root)
    folders = []
    for folder in backup_folders(root):
        if (folder / WORK_DIR).is_dir():
            folders.append(FolderPlan(folder, None, [], [], pending=True))
            continue
        folders.append(read_folder(folder))
    points = [p for f in folders for p in f.links + f.diffs]
    # Newest last, for select(): by time, then by place in the chain.
    dated = [Dated(p.key, p.time, p.protected) for p in points]
    reasons = select(dated, rules)
    for f in folders:
        if not f.pending:
            _decide(f, reasons)
    return PrunePlan(root, rules, folders)


def _decide(plan: FolderPlan, reasons: dict[Hashable, list[str]]) -> None:
    links, diffs = plan.links, plan.diffs
    kept_by_rule = {p.key for p in links + diffs if reasons[p.key]}
    position = {p.checkpoint: i for i, p in enumerate(links)}
    # Link position -> the kept point that needs it, the nearest one after it.
    needed: dict[int, str] = {}
    tops = [(i, p.ident) for i, p in enumerate(links) if p.key in kept_by_rule]
    tops += [(position[d.parent], d.ident) for d in diffs if d.key in kept_by_rule]
    for top, ident in sorted(tops, reverse=True):
        for j in range(top + 1):
            needed[j] = ident
    if not kept_by_rule:
        for p in links + diffs:
            plan.rows.append(Row(p, REMOVE, "no rule keeps it"))
        return
    base = min(top for top, _ident in tops)
    last_needed = max(needed)
    for i, p in enumerate(links):
        rule = ", ".join(reasons[p.key])
        if i < base:
            target = links[base].ident
            plan.rows.append(Row(p, MERGE, f"into the new full at {target}"))
        elif p.key in kept_by_rule:
            suffix = "; becomes the full" if i == base and base > 0 else ""
            plan.rows.append(Row(p, KEEP, rule + suffix))
        elif i <= last_needed:
            suffix = "; becomes the full" if i == base and base > 0 else ""
            plan.rows.append(Row(p, KEEP, f"needed by {needed[i]}{suffix}"))
        elif i == len(links) - 1:
            plan.rows.append(Row(p, KEEP, "end of the chain: the next inc builds on it"))
        else:
            plan.rows.append(Row(p, KEEP, f"needed by {links[-1].ident} (end of the chain)"))
    for d in diffs:
        if d.key in kept_by_rule:
            plan.rows.append(Row(d, KEEP, ", ".join(reasons[d.key])))
        else:
            plan.rows.append(Row(d, REMOVE, "no rule keeps it"))
    plan.rows.sort(key=lambda r: (r.point.time, r.point.ident))
