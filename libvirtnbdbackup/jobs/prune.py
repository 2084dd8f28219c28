"""Prune backup folders by keep rules: merge forward, remove, never lose a kept point.

A merge writes each disk's synthetic full into the folder's work folder
``.virtnbdprune/`` (fsync, then checked against the chain it replaces),
then writes the journal ``.virtnbdprune/journal.json``: from that moment
the merge is committed and only rolled forward. Rolling forward moves the
files it replaces into ``.virtnbdprune/old/``, moves the new files into
the folder, updates the checkpoint XML and the list of merged
checkpoints, deletes the merged checkpoints in libvirt and last removes
the work folder. Every step can be repeated, so a run killed at any point
is finished by the next one; a work folder without a journal is an
unfinished merge, which the next run removes, leaving the old chain as it
was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..adapters.domainxml import boot_files
from ..adapters.virt import Hypervisor, own_checkpoints
from ..errors import DomainError, StreamError, TargetError
from ..format.checked import SetCheck, check_chain, set_check
from ..format.index import index_path
from ..format.manifest import FileEntry, Manifest, manifest_name, read_state
from ..format.merge import merge_chain, verify_merged
from ..format.reader import file_adler32
from ..format.zeros import zeros_of_index, zeros_path
from ..targets.directory import DirectoryTarget, PartialFile, fsync_dir, write_atomic
from ..targets.lock import FolderLock
from ..targets.private import PRIVATE_DIR
from .backupset import DataFile
from .chainplan import MERGED_FILE, read_merged
from .keeprules import KeepRules
from .pruneplan import (
    PROTECT_SUFFIX,
    WORK_DIR,
    FolderPlan,
    Point,
    PrunePlan,
    backup_folders,
    plan_prune,
)

log = logging.getLogger(__name__)

JOURNAL = "journal.json"
OLD_DIR = "old"
CHECKPOINT_DIR = "checkpoints"

Step = Callable[[str], None]


@dataclass(frozen=True)
class Libvirt:
    """Where the checkpoints of merged backups are deleted."""

    uri: str = "qemu:///system"
    user: str | None = None
    password: str | None = None


@dataclass
class PruneResult:
    plan: PrunePlan
    merged_bytes: int = 0  # bytes written into synthetic fulls
    removed_files: int = 0


def _no_step(_name: str) -> None:
    pass


def prune(
    root: str | Path,
    rules: KeepRules,
    *,
    dry_run: bool = False,
    verify: bool = False,
    libvirt: Libvirt | None = None,
    on_step: Step = _no_step,
) -> PruneResult:
    """Plan (and unless ``dry_run`` carry out) the prune of ``root``.

    ``root`` is one backup folder or a folder of them. ``verify`` compares
    every byte of a merged file instead of a sample. ``on_step`` is called
    with the name of each step as it is done (for tests that stop a run
    there).
    """
    root = Path(root)
    uri = libvirt or Libvirt()
    if dry_run:
        return PruneResult(plan_prune(root, rules))
    with _locked(backup_folders(root)):
        for folder in backup_folders(root):
            recover(folder, uri, on_step)
        plan = plan_prune(root, rules)
        result = PruneResult(plan)
        for fplan in plan.folders:
            _apply(fplan, result, verify=verify, uri=uri, on_step=on_step)
    return result


@contextlib.contextmanager
def _locked(folders: list[Path]) -> Iterator[None]:
    """Every folder of the prune, locked against backups writing into it."""
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(FolderLock(folder, "virtnbdprune"))
        yield


def _apply(
    fplan: FolderPlan, result: PruneResult, *, verify: bool, uri: Libvirt, on_step: Step
) -> None:
    if not fplan.changes:
        return
    if fplan.remove_all:
        _remove_folder_set(fplan, result, uri)
        return
    if fplan.merges:
        result.merged_bytes += _merge(fplan, verify=verify, uri=uri, on_step=on_step)
        return
    for point in sorted(fplan.removed, key=lambda p: p.time, reverse=True):
        result.removed_files += _delete(fplan.folder, point_files(fplan.folder, point))
        log.info("%s: removed %s %s", fplan.folder, point.level, point.ident)


def point_files(folder: Path, point: Point, *, side: bool = True, raw: bool = False) -> list[str]:
    """Names (relative to ``folder``) of the files of a point that exist.

    Raw images (``raw``) only when the whole set goes: a raw disk saved with
    the full backup is that disk's only copy, whatever is merged.
    """
    names: list[str] = []
    for f in point.files:
        if f.meta is None and not raw:
            continue
        # .zeros: the ranges an inc leaves to zero, in a side file
        names += [f.name, f"{f.name}.chksum", index_path(f.name), f"{f.name}.zeros"]
    if side:
        config = folder / f"vmconfig.{point.ident}.xml"
        names.append(config.name)
        names += [p.name for p in folder.glob(f"*.{point.ident}.qcow.json")]
        if config.is_file():
            with contextlib.suppress(OSError, ET.ParseError):
                names += [
                    f"{os.path.basename(b)}.{point.ident}" for b in boot_files(config.read_text())
                ]
        names.append(f"{point.ident}{PROTECT_SUFFIX}")
        names.append(manifest_name(point.ident))
    return [n for n in dict.fromkeys(names) if (folder / n).exists()]


def _delete(folder: Path, names: list[str]) -> int:
    for name in names:
        (folder / name).unlink(missing_ok=True)
    fsync_dir(folder)
    return len(names)


def _checkpoint_names(points: list[Point], keep: set[str]) -> list[str]:
    """Checkpoints libvirt created for these points (not diffs), minus ``keep``."""
    names = [p.checkpoint for p in points if p.level in ("full", "inc") and p.checkpoint]
    return [n for n in dict.fromkeys(names) if n not in keep]


def _creation_time(xml: str) -> str | None:
    try:
        node = ET.fromstring(xml).find("creationTime")
    except ET.ParseError:
        return None
    return node.text if node is not None else None


def _saved_times(folder: Path, names: list[str]) -> dict[str, str]:
    times = {}
    for name in names:
        saved = folder / CHECKPOINT_DIR / f"{name}.xml"
        with contextlib.suppress(OSError):
            when = _creation_time(saved.read_text())
            if when:
                times[name] = when
    return times


def _merge(fplan: FolderPlan, *, verify: bool, uri: Libvirt, on_step: Step) -> int:
    """Write, check and commit every merge of a folder; the bytes written."""
    folder = fplan.folder
    # The checked reader: in a set with manifests only committed files of one
    # chain, of the sizes and sums recorded (a set of 2.x: its .chksum files).
    check = set_check(folder)
    # Incs that 2.x added have no manifest to keep consistent: a backup of ours adopts them.
    check.usable(sorted(p.name for p in folder.glob("*.data")), accept_2x=False)
    work = folder / WORK_DIR
    work.mkdir(mode=PRIVATE_DIR)
    fsync_dir(folder)
    written = 0
    install: list[str] = []
    new_files: dict[str, list[str]] = {}  # merge target ident -> its new files
    parents: dict[str, str | None] = {}
    try:
        for target, group in fplan.merges:
            first = fplan.links.index(group[0])
            parent = fplan.links[first - 1].checkpoint if first else None
            parents[target.checkpoint] = parent
            for f in target.files:
                if f.meta is None:
                    continue  # a raw image saved with the full stays as it is
                paths = [str(_file_of(p, f.disk).path) for p in [*group, target]]
                check_chain(check, f.disk, [Path(p).name for p in paths])
                sums = [_expected_sum(check, Path(p)) for p in paths]
                name = f"{f.disk}.full.data" if parent is None else f.name
                size, made = _merge_one(paths, sums, work, name, parent, verify, on_step)
                written += size
                install += made
                new_files.setdefault(target.ident, []).extend(made)
                mtime = os.stat(f.path).st_mtime  # 2.x orders a chain by mtime
                os.utime(work / name, (mtime, mtime))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    merged = fplan.merged
    staying = {p.checkpoint for p in fplan.links if p not in merged}
    retire: list[str] = []
    for point in merged:
        retire += point_files(folder, point)
    for target, _group in fplan.merges:
        retire += point_files(folder, target, side=False)
    for point in fplan.removed:
        retire += point_files(folder, point)
    dropped = _checkpoint_names(merged, staying)
    retire += [
        f"{CHECKPOINT_DIR}/{n}.xml"
        for n in dropped
        if (folder / CHECKPOINT_DIR / f"{n}.xml").exists()
    ]
    retire = list(dict.fromkeys(retire))
    for name, manifest in _updated_manifests(fplan, work, new_files, retire).items():
        write_atomic(work / name, manifest.to_bytes())
        install.append(name)
        if (folder / name).exists() and name not in retire:
            retire.append(name)
    journal = {
        "install": install,
        "retire": retire,
        "merged": dropped,
        "parents": parents,
        "domain": fplan.domain,
        "creationTimes": _saved_times(folder, dropped),
    }
    write_atomic(work / JOURNAL, json.dumps(journal, indent=2).encode())
    fsync_dir(work)
    on_step("journal")
    _roll_forward(folder, journal, uri, on_step)
    return written


def _updated_manifests(
    fplan: FolderPlan, work: Path, new_files: dict[str, list[str]], retire: list[str]
) -> dict[str, Manifest]:
    """The commit points of the runs that stay, for the set after the merge.

    A merged run's manifest goes with its files. The run each merge lands
    on lists its new files (size and Adler-32 as written) instead of the
    ones they replace, and a new full's run becomes a full; any other
    manifest only drops names that are gone. Runs of 2.x, without a
    manifest, get none.
    """
    folder = fplan.folder
    state = read_state(DirectoryTarget(folder))
    targets = {t.ident: t for t, _group in fplan.merges}
    full_ident = fplan.merges[0][0].ident if fplan.merges[0][1][0] is fplan.links[0] else None
    gone = set(retire)
    fresh = {
        # A data file's sum is its writer's (written to its .chksum): no second read.
        name: FileEntry((work / name).stat().st_size, _sum_of(work, name))
        for names in new_files.values()
        for name in names
    }
    updated: dict[str, Manifest] = {}
    for ident, manifest in state.manifests.items():
        if manifest.name in gone and ident not in targets:
            continue  # a merged or removed run
        files = {n: e for n, e in manifest.files.items() if n not in gone}
        adopted = tuple(n for n in manifest.adopted if n not in gone)
        level = manifest.level
        if ident in targets:
            files.update({n: fresh[n] for n in new_files[ident]})
            if ident == full_ident:
                level = "full"
        if (files, adopted, level) != (manifest.files, manifest.adopted, manifest.level):
            updated[manifest.name] = dataclasses.replace(
                manifest, files=files, adopted=adopted, level=level
            )
    return updated


def _sum_of(work: Path, name: str) -> int:
    if name.endswith(".data"):
        return int((work / f"{name}.chksum").read_text())
    return file_adler32(str(work / name))


def _expected_sum(check: SetCheck, path: Path) -> int:
    expected = check.expected(path)
    if expected.adler32 is None:
        raise StreamError(
            f"{path} has no checksum (no {path.name}.chksum, no manifest entry): its bytes "
            "cannot be checked, so it is not merged"
        )
    return expected.adler32


def _merge_one(
    paths: list[str],
    sums: list[int],
    work: Path,
    name: str,
    parent: str | None,
    verify: bool,
    on_step: Step,
) -> tuple[int, list[str]]:
    """One disk's files merged into ``work/name`` with its side files
    (checksum, index, and for an inc its zero ranges), checked; its size
    and the names made."""
    sink = PartialFile(work / name)
    try:
        result = merge_chain(paths, sink.file, name, parent=parent, checksums=sums)
    except BaseException:
        sink.abort()
        raise
    sink.commit()
    write_atomic(work / f"{name}.chksum", str(result.adler32).encode())
    write_atomic(work / index_path(name), result.index.to_bytes())
    made = [name, f"{name}.chksum", index_path(name)]
    if parent is not None:  # an inc holds data frames only; its zero ranges go here
        write_atomic(work / zeros_path(name), zeros_of_index(result.index))
        made.append(zeros_path(name))
    on_step(f"written {name}")
    compared = verify_merged(paths, str(work / name), result.segments, full=verify)
    log.info(
        "%s: merged %d files into %s (%d bytes, %d copied as stored, %d bytes compared)",
        work.parent,
        len(paths),
        name,
        result.index.file_size,
        result.copied_whole,
        compared,
    )
    on_step(f"verified {name}")
    return result.index.file_size, made


def _file_of(point: Point, disk: str) -> DataFile:
    for f in point.files:
        if f.disk == disk:
            return f
    raise StreamError(f"{point.folder}: backup {point.ident} has no data file of disk {disk}")


def recover(folder: Path, uri: Libvirt, on_step: Step = _no_step) -> None:
    """Finish a committed merge that a run left, or remove an uncommitted one."""
    work = folder / WORK_DIR
    if not work.is_dir():
        return
    try:
        journal = json.loads((work / JOURNAL).read_text())
    except FileNotFoundError:
        log.warning(
            "%s: removing an unfinished merge of an interrupted prune (nothing changed)", folder
        )
        shutil.rmtree(work)
        fsync_dir(folder)
        return
    except (OSError, ValueError) as err:
        raise TargetError(
            f"{work / JOURNAL} cannot be read ({err}): an interrupted prune cannot be finished; "
            f"the replaced files are in {work / OLD_DIR}"
        ) from None
    log.warning("%s: finishing the merge of an interrupted prune", folder)
    _roll_forward(folder, journal, uri, on_step)


def _roll_forward(folder: Path, journal: dict, uri: Libvirt, on_step: Step) -> None:
    work = folder / WORK_DIR
    old = work / OLD_DIR
    for made in (old, old / CHECKPOINT_DIR):
        made.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    for name in journal["retire"]:
        # A name already in old/ was retired by the run that was stopped: the
        # file of that name in the folder now is the new one (vda.full.data).
        if (folder / name).exists() and not (old / name).exists():
            os.rename(folder / name, old / name)
            on_step(f"retired {name}")
    fsync_dir(folder)
    for name in journal["install"]:
        if (work / name).exists():
            os.rename(work / name, folder / name)
            on_step(f"installed {name}")
    fsync_dir(folder)
    parents = journal.get("parents") or {journal.get("base"): None}
    for checkpoint, parent in parents.items():
        _reparent_checkpoint(folder / CHECKPOINT_DIR / f"{checkpoint}.xml", parent)
    merged = sorted(set(read_merged(folder)) | set(journal["merged"]))
    write_atomic(folder / MERGED_FILE, json.dumps({"merged": merged}, indent=2).encode())
    on_step("metadata")
    if journal["domain"] and journal["merged"]:
        _drop_checkpoints(journal["domain"], uri, journal["merged"], journal["creationTimes"])
    on_step("checkpoints")
    shutil.rmtree(work)
    fsync_dir(folder)
    on_step("done")


def _reparent_checkpoint(path: Path, parent: str | None) -> None:
    """The saved XML of a checkpoint whose parent changed: a new full's has
    none, a merged inc's is the link before the merged ones."""
    try:
        root = ET.fromstring(path.read_text())
    except (OSError, ET.ParseError):
        return
    node = root.find("parent")
    if parent is None:
        if node is None:
            return
        root.remove(node)
    else:
        if node is None:
            node = ET.SubElement(root, "parent")
        name = node.find("name")
        if name is None:
            name = ET.SubElement(node, "name")
        if name.text == parent:
            return
        name.text = parent
    write_atomic(path, ET.tostring(root, encoding="unicode").encode())


def _drop_checkpoints(
    domain_name: str, uri: Libvirt, names: list[str], times: dict[str, str]
) -> None:
    """Delete merged checkpoints in libvirt, oldest first (each the root, so
    no bitmap is merged into another), only those this chain created."""
    try:
        hypervisor = Hypervisor(uri.uri, uri.user, uri.password)
    except DomainError as err:
        log.warning("libvirt checkpoints of merged backups not removed: %s", err)
        return
    try:
        domain = hypervisor.domain(domain_name)
        known = set(domain.checkpoint_names())
        for name in reversed(own_checkpoints(names)):
            if name not in known:
                continue
            if (
                times.get(name) is None
                or _creation_time(domain.checkpoint_xml(name)) != times[name]
            ):
                log.info(
                    "checkpoint %s of %s is not this chain's: left as it is", name, domain_name
                )
                continue
            domain.delete_checkpoint(name)
            log.info("removed checkpoint %s of domain %s (merged)", name, domain_name)
    except DomainError as err:
        log.warning("libvirt checkpoints of merged backups not all removed: %s", err)
    finally:
        hypervisor.close()


def _remove_folder_set(fplan: FolderPlan, result: PruneResult, uri: Libvirt) -> None:
    """No point of the folder is kept: remove its backup set, newest first."""
    folder = fplan.folder
    names = _checkpoint_names(fplan.links, set())
    times = _saved_times(folder, names)
    points = sorted(fplan.links + fplan.diffs, key=lambda p: p.time, reverse=True)
    for point in points:
        result.removed_files += _delete(folder, point_files(folder, point, raw=True))
    extra = [f"{CHECKPOINT_DIR}/{n}.xml" for n in names]
    extra += [p.name for p in [*folder.glob("*.cpt"), *folder.glob("*.chain.json")]]
    extra.append(MERGED_FILE)
    result.removed_files += _delete(folder, [n for n in extra if (folder / n).exists()])
    with contextlib.suppress(OSError):
        (folder / CHECKPOINT_DIR).rmdir()
    if fplan.domain and names:
        _drop_checkpoints(fplan.domain, uri, names, times)
    log.info("%s: removed the whole backup set (no point of it is kept)", folder)
