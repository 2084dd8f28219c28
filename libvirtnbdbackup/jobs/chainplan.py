"""Names and links of one backup in a checkpoint chain.

The chain of a backup folder is the list in ``<domain>.cpt``: the full
backup's checkpoint ``virtnbdbackup.0``, then one checkpoint per
incremental backup. A differential backup saves the changes since the last
checkpoint without creating one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..adapters.virt import CHECKPOINT_PREFIX
from ..errors import UsageError
from .backupset import plain_name


@dataclass(frozen=True)
class BackupStep:
    level: str  # copy, full, inc or diff
    checkpoint: str  # checkpointName written into the meta JSON
    parent: str  # parentCheckpoint, "" for copy and full
    create: str | None  # checkpoint libvirt creates with this backup
    since: str | None  # checkpoint whose bitmap selects the changed blocks
    ident: str  # names side files: vmconfig.<ident>.xml, <dev>.<ident>.qcow.json
    file_tag: str  # <dev>.<file_tag>.data

    @property
    def incremental(self) -> bool:
        return self.since is not None


# Checkpoints of the chain that virtnbdprune merged into a synthetic full:
# still in <domain>.cpt (the next checkpoint's number is the list's length,
# in 2.47 as here), but gone from libvirt and from checkpoints/.
MERGED_FILE = "virtnbdprune.json"


def read_merged(folder: Path) -> list[str]:
    """The merged checkpoints recorded in ``folder`` (none if no prune merged)."""
    try:
        doc = json.loads((folder / MERGED_FILE).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise UsageError(f"{folder / MERGED_FILE} is damaged ({err})") from None
    merged = doc.get("merged") if isinstance(doc, dict) else None
    if not isinstance(merged, list) or not all(isinstance(n, str) for n in merged):
        raise UsageError(f"{folder / MERGED_FILE} does not list checkpoint names")
    return merged


def checkpoint_name(number: int) -> str:
    return f"{CHECKPOINT_PREFIX}.{number}"


def read_chain(cpt_file: Path) -> list[str]:
    if not cpt_file.is_file():
        return []
    try:
        chain = json.loads(cpt_file.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{cpt_file} is damaged ({err}); start a new chain with -l full") from None
    if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
        raise UsageError(f"{cpt_file} is not a list of checkpoint names")
    for name in chain:  # each names a file in the checkpoint folder
        plain_name(name, f"in {cpt_file.name} the checkpoint")
    return chain


def plan_step(level: str, chain: list[str], *, offline: bool, epoch: int) -> BackupStep:
    """What a backup at ``level`` writes, given the chain so far."""
    if level == "copy":
        first = checkpoint_name(0)
        return BackupStep("copy", first, "", None, None, "copy", "copy")
    if level == "full":
        first = checkpoint_name(0)
        return BackupStep("full", first, "", first, None, first, "full")
    if not chain:
        raise UsageError(
            f"an {level} backup needs the chain of a full backup in this folder "
            "(no checkpoints recorded); take a full backup first"
        )
    parent = chain[-1]
    following = checkpoint_name(len(chain))
    if level == "inc":
        if offline:
            # No checkpoint can be created without QEMU: the changes since
            # the parent are saved under the parent's name.
            # The epoch keeps it apart from the parent's own incremental file.
            ident = f"{parent}.{epoch}"
            return BackupStep("inc", parent, parent, None, parent, ident, f"inc.{ident}")
        return BackupStep(
            "inc", following, parent, following, parent, following, f"inc.{following}"
        )
    if level == "diff":
        return BackupStep("diff", following, parent, None, parent, str(epoch), f"diff.{epoch}")
    raise UsageError(f"unknown backup level {level}")
