"""What a killed backup run left, recognised and put right by the next run.

A backup killed (SIGKILL, a crash, a second Ctrl-C) cannot clean up: its
backup job keeps running in libvirt, the checkpoint it created stays, its
``.partial`` files stay, and a data file it had completed may have no
entry in ``<domain>.cpt``. Each of these used to make every later backup
fail. The run's folder lock (targets/lock.py) survives it as a stale lock
whose record says which process it was and which checkpoint it was about
to create: with that evidence, and only with it, the next run into the
folder takes the job down, rolls the checkpoint back (or records it, when
its backup was committed) and sets the unfinished files aside, each with a
warning.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..adapters.hosts import SCRATCH_PREFIX
from ..format.manifest import manifest_name
from ..targets.directory import PARTIAL_SUFFIX
from ..targets.lock import describe
from .backupoptions import DEFAULT_SCRATCH_PARENT
from .chainplan import read_chain

log = logging.getLogger(__name__)

def committed(folder: Path, ident: str) -> bool:
    """Whether the backup ``ident`` reached its commit point in ``folder``."""
    return (folder / manifest_name(ident)).is_file()


def killed_checkpoint(stale: dict[str, Any] | None, domain: str) -> str | None:
    """The checkpoint a killed run of ``domain`` was creating, from its lock."""
    if not stale or stale.get("domain") != domain:
        return None
    checkpoint = stale.get("checkpoint")
    return checkpoint if isinstance(checkpoint, str) and checkpoint else None


def run_files(folder: Path, ident: str) -> list[Path]:
    """The files a backup ``ident`` (a checkpoint name) writes into a folder."""
    names = [f"*.inc.{ident}.data", f"vmconfig.{ident}.xml", f"*.{ident}.qcow.json", f"*.{ident}"]
    if ident.endswith(".0"):
        names.append("*.full.data")
    found: set[Path] = set()
    for pattern in names:
        for path in folder.glob(pattern):
            found.add(path)
            for side in (".chksum", ".idx"):
                if path.with_name(path.name + side).exists():
                    found.add(path.with_name(path.name + side))
    return sorted(p for p in found if p.is_file())


def clear_killed_run(folder: Path, stale: dict[str, Any] | None, cpt_file: Path) -> None:
    """Before a backup into ``folder`` whose lock a dead run left: remove its
    ``.partial`` files, and set aside the files of a backup it did not
    commit (kept, in ``interrupted.<checkpoint>.<time>/``)."""
    if not stale:
        return
    who = describe(stale)
    partials = sorted(folder.glob(f"*{PARTIAL_SUFFIX}"))
    for path in partials:
        path.unlink(missing_ok=True)
    if partials:
        log.warning(
            "removed the unfinished files of %s, which was killed: %s",
            who,
            ", ".join(p.name for p in partials),
        )
    checkpoint = stale.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint:
        return
    if checkpoint in read_chain(cpt_file) or committed(folder, checkpoint):
        return
    leftovers = run_files(folder, checkpoint)
    if not leftovers:
        return
    aside = folder / f"interrupted.{checkpoint}.{time.strftime('%Y%m%d%H%M%S')}"
    aside.mkdir()
    for path in leftovers:
        os.rename(path, aside / path.name)
    log.warning(
        "backup %s of %s, which was killed, was never committed: its files (%s) are set "
        "aside in %s; the chain goes on from its last committed backup",
        checkpoint,
        who,
        ", ".join(p.name for p in leftovers),
        aside,
    )


def job_of(job_xml: str | None, scratch: object) -> bool:
    """Whether a backup job is the one a run started with scratch file
    ``scratch`` (each run's scratch file names are its own)."""
    return bool(job_xml and isinstance(scratch, str) and scratch and any(
        f"{q}{scratch}{q}" in job_xml for q in "'\""
    ))


def killed_scratch_folder(scratch: object) -> str | None:
    """The private scratch folder (``/var/tmp/virtnbdbackup.XXXXXXXX``) a
    killed run made for its job, or None (``--scratchdir`` is the user's)."""
    if not isinstance(scratch, str):
        return None
    folder = os.path.dirname(scratch)
    parent, name = os.path.split(folder)
    if parent != DEFAULT_SCRATCH_PARENT or not name.startswith(SCRATCH_PREFIX):
        return None
    return folder
