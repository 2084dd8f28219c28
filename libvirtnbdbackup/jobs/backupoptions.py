"""What a backup is asked to do, and whether its output folder fits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..format.manifest import read_state
from ..targets.directory import PARTIAL_SUFFIX, DirectoryTarget
from .remote import RemoteOptions

DEFAULT_SCRATCH_PARENT = "/var/tmp"
# Files whose presence means the folder already holds a backup set.
BACKUP_SET_PATTERNS = ("*.data", "*.data.partial", "*.cpt", "vmconfig.*.xml")


@dataclass
class BackupOptions:
    domain: str
    level: str  # copy, full, inc or diff (auto is resolved before the job)
    output: str  # a folder, or "-" for a zip on stdout
    uri: str = "qemu:///system"
    user: str | None = None
    password: str | None = None
    output_type: str = "stream"  # stream or raw
    raw: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    checkpoint_dir: str | None = None
    scratch_dir: str | None = None  # None: a fresh folder in DEFAULT_SCRATCH_PARENT
    socket_file: str | None = None
    compress: int | None = None
    workers: int | None = None
    progress: bool = True
    sparse: bool = True
    printonly: bool = False  # print the estimated size of the next inc/diff, then stop
    threshold: int = 0  # skip an inc/diff that changed fewer bytes
    start_domain: bool = False  # back up a shut-off domain by starting it paused
    pause: bool = False  # suspend the domain while the backup job starts
    qemu: bool = False  # -q: read the extent maps with nbdinfo
    startonly: bool = False  # -s: start the backup job, leave it running, read nothing
    # -F: the guest mountpoints to freeze while the backup job starts (None: all)
    freeze_mountpoints: list[str] | None = None
    remote: RemoteOptions = field(default_factory=RemoteOptions)

    @property
    def cpt_file(self) -> Path:
        return self.meta_dir / f"{self.domain}.cpt"

    @property
    def to_stdout(self) -> bool:
        return self.output == "-"

    @property
    def meta_dir(self) -> Path:
        """Where the checkpoint list and checkpoint XML files live."""
        return Path("." if self.to_stdout else self.output)


def backup_set_files(folder: Path) -> list[str]:
    """The files that make ``folder`` a backup set; what a killed run left
    (named in its journal, see format/manifest.py) does not count: the next
    run takes it back."""
    if not folder.is_dir():
        return []
    found = {p.name for pat in BACKUP_SET_PATTERNS for p in folder.glob(pat)}
    leftovers = read_state(DirectoryTarget(folder)).uncommitted
    leftovers |= {name + PARTIAL_SUFFIX for name in leftovers}
    return sorted(found - leftovers)


def leftover_partials(folder: Path, opts: BackupOptions) -> list[str]:
    """Files a failed run left half-written: any ``*.partial`` of this tool,
    in the folder or its checkpoint folder (2.x refuses inc/diff on any)."""
    folders = [folder, Path(opts.checkpoint_dir) if opts.checkpoint_dir else folder / "checkpoints"]
    found = []
    for where in folders:
        if where.is_dir():
            found += sorted(
                str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p)
                for p in where.glob("*.partial")
            )
    return found


def resolve_level(opts: BackupOptions) -> str:
    """``auto``: a full backup into an empty folder, else an incremental one."""
    if opts.level != "auto":
        return opts.level
    if opts.to_stdout:
        raise UsageError("level auto needs a backup folder, not standard output")
    return "inc" if backup_set_files(Path(opts.output)) else "full"


def check_output_folder(opts: BackupOptions) -> None:
    """Refuse a folder that does not fit the level: never overwrite a backup."""
    if opts.to_stdout:
        if opts.output_type == "raw":
            raise UsageError("output type raw cannot be written to standard output")
        return
    folder = Path(opts.output)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    found = backup_set_files(folder)
    if opts.level in ("copy", "full"):
        if found:
            raise UsageError(
                f"{folder} already holds a backup set ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}); a {opts.level} backup needs an "
                "empty folder: choose a new one"
            )
        return
    if opts.output_type == "raw":
        raise UsageError(f"output type raw cannot hold {opts.level} backups; use the stream type")
    if opts.raw:
        raise UsageError(
            f"raw-format disks have no dirty bitmap: leave out --raw for {opts.level} backups"
        )
    partial = leftover_partials(folder, opts)
    if partial:
        raise UsageError(
            f"{folder} holds unfinished files of a failed backup ({', '.join(partial)}); "
            f"an {opts.level} backup on top of it could not be restored: remove them and take "
            "a new full backup into a new folder"
        )
    if not opts.cpt_file.is_file():
        raise UsageError(
            f"{folder} holds no full backup to build on ({opts.cpt_file.name} is missing); "
            "take a full backup first"
        )
