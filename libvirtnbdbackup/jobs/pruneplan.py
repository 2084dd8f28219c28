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
    def merges(self) -> list[tuple[Point, list[Point]]]:
        """Each link that takes the place of links merged into it, with them
        (oldest first). A group that holds the chain's first link makes a
        new full; any other, an inc on the link before the group."""
        action = {r.point.key: r.action for r in self.rows}
        groups: list[tuple[Point, list[Point]]] = []
        pending: list[Point] = []
        for link in self.links:
            if action.get(link.key) == MERGE:
                pending.append(link)
            elif pending:
                groups.append((link, pending))
                pending = []
        return groups

    @property
    def merged(self) -> list[Point]:
        return [p for _target, group in self.merges for p in group]

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
    """Keep, merge or remove each point of one folder.

    The links a kept point stands on directly stay: each link kept by a
    rule, the parent of each kept diff, and the chain's last link. The
    links before the oldest of them merge into a new full at it; the links
    between two of them merge into one inc at the later one.
    """
    links, diffs = plan.links, plan.diffs
    kept_by_rule = {p.key for p in links + diffs if reasons[p.key]}
    if not kept_by_rule:
        for p in links + diffs:
            plan.rows.append(Row(p, REMOVE, "no rule keeps it"))
        return
    position = {p.checkpoint: i for i, p in enumerate(links)}
    why: dict[int, str] = {}
    for i, p in enumerate(links):
        if p.key in kept_by_rule:
            why[i] = ", ".join(reasons[p.key])
    for d in diffs:
        if d.key in kept_by_rule:
            why.setdefault(position[d.parent], f"parent of kept diff {d.ident}")
    why.setdefault(len(links) - 1, "end of the chain: the next inc builds on it")
    stays = sorted(why)
    base = stays[0]
    for i, p in enumerate(links):
        if i in why:
            suffix = "; becomes the full" if i == base and base > 0 else ""
            plan.rows.append(Row(p, KEEP, why[i] + suffix))
        elif i < base:
            plan.rows.append(Row(p, MERGE, f"into the new full at {links[base].ident}"))
        else:
            target = links[next(j for j in stays if j > i)]
            plan.rows.append(Row(p, MERGE, f"into {target.ident}"))
    for d in diffs:
        if d.key in kept_by_rule:
            plan.rows.append(Row(d, KEEP, ", ".join(reasons[d.key])))
        else:
            plan.rows.append(Row(d, REMOVE, "no rule keeps it"))
    plan.rows.sort(key=lambda r: (r.point.time, r.point.ident))
