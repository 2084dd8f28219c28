"""virtnbdbackup: back up a libvirt domain's disks."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from datetime import datetime
from pathlib import Path

from .. import __version__
from ..adapters.domainxml import split_names
from ..errors import UsageError, VirtnbdError
from ..interrupts import Cancel
from ..jobs.backup import BackupJob, kill_backup_job
from ..jobs.backupoptions import BackupOptions, check_output_folder, resolve_level
from ..jobs.recovery import clear_killed_run
from ..targets.base import Target
from ..targets.directory import DirectoryTarget
from ..targets.lock import FolderLock
from ..targets.private import create_private, make_private_dir
from ..targets.zipstream import ZipTarget
from .common import (
    EXIT_ERROR,
    EarlyRecords,
    add_common_args,
    add_compress_arg,
    add_connection_args,
    add_remote_args,
    install_signal_handlers,
    libvirt_password,
    remote_options,
    run_job,
    setup_logging,
    warn_command_line_password,
)

log = logging.getLogger("virtnbdbackup")

EXAMPLES = """\
examples:
  # full backup of domain webvm, all disks:
  virtnbdbackup -d webvm -l full -o /backup/webvm
  # then save what changed since (run from cron: full into an empty folder, else inc):
  virtnbdbackup -d webvm -l auto -o /backup/webvm
  # copy backup (no checkpoint) of disk vda only, lz4 compressed:
  virtnbdbackup -d webvm -l copy -i vda -z -o /backup/webvm-copy
  # full backup as a zip archive on standard output:
  virtnbdbackup -d webvm -l full -o - > webvm.zip
  # full backup of domain vm1 on hypervisor hv1, disks over NBD with TLS:
  virtnbdbackup -U qemu+ssh://root@hv1/system --tls -d vm1 -l full -o /backup/vm1
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtnbdbackup",
        description="Back up libvirt/qemu virtual machines.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt = parser.add_argument_group("General options")
    opt.add_argument("-d", "--domain", required=True, help="Domain to back up.")
    opt.add_argument(
        "-l",
        "--level",
        default="copy",
        choices=["copy", "full", "inc", "diff", "auto"],
        help="Backup level. (default: %(default)s)",
    )
    opt.add_argument(
        "-t",
        "--type",
        default="stream",
        choices=["stream", "raw"],
        help="Output type: stream or raw. (default: %(default)s)",
    )
    opt.add_argument(
        "-r",
        "--raw",
        action="store_true",
        help="Include raw-format disk images (as full-size copies). (default: %(default)s)",
    )
    opt.add_argument(
        "-o",
        "--output",
        required=True,
        help="Output folder, or - for a zip archive on standard output.",
    )
    opt.add_argument(
        "-C",
        "--checkpointdir",
        default=None,
        help="Folder for the checkpoint XML files. (default: OUTPUT/checkpoints)",
    )
    opt.add_argument(
        "--scratchdir",
        default=None,
        help="Folder for the backup job's scratch files, named as by 2.47. (default: a fresh "
        "folder in /var/tmp that only QEMU's user and root can enter)",
    )
    opt.add_argument("-i", "--include", default=None, help="Back up only these disks (-i vda,vdb).")
    opt.add_argument("-x", "--exclude", default=None, help="Leave out these disks (-x vda,vdb).")
    opt.add_argument(
        "-f",
        "--socketfile",
        default=None,
        help="Unix socket for the NBD server. (default: in the fresh scratch folder, or "
        "SCRATCHDIR/virtnbdbackup.PID with --scratchdir)",
    )
    opt.add_argument(
        "--no-sparse-detection",
        action="store_true",
        help="inc/diff: save every changed block, also those now unallocated "
        "(trimmed); bigger backups. (default: %(default)s)",
    )
    opt.add_argument("-n", "--noprogress", action="store_true", help="Disable progress bars.")
    add_compress_arg(opt)
    opt.add_argument(
        "-w",
        "--worker",
        type=int,
        default=None,
        help="Disks backed up at once. (default: one per disk)",
    )
    opt.add_argument(
        "-S",
        "--start-domain",
        action="store_true",
        help="Start a shut-off domain paused for the backup, shut it off afterwards.",
    )
    opt.add_argument(
        "--pause",
        action="store_true",
        help="Pause a running domain while the backup job starts. (default: %(default)s)",
    )
    opt.add_argument(
        "-F",
        "--freeze-mountpoint",
        default=None,
        metavar="MOUNTPOINTS",
        help="Freeze only these guest filesystems (-F /var/lib/mysql,/data) through the guest "
        "agent while the checkpoint and the backup job are created. (default: all of them)",
    )
    add_connection_args(parser)
    add_remote_args(parser)
    debug = parser.add_argument_group("Job control")
    debug.add_argument(
        "-p",
        "--printonly",
        action="store_true",
        help="Print the size of the backup in bytes, then exit: inc/diff estimate it from "
        "the checkpoint, full/copy read the data extents (nothing is saved).",
    )
    debug.add_argument(
        "-T",
        "--threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="inc/diff: skip the backup when fewer bytes changed (full and copy backups "
        "always run). (default: %(default)s)",
    )
    debug.add_argument(
        "-q",
        "--qemu",
        action="store_true",
        help="Read the extent maps with nbdinfo (libnbd-bin) instead of over the "
        "backup's own NBD connection. (default: %(default)s)",
    )
    debug.add_argument(
        "-s",
        "--startonly",
        action="store_true",
        help="Only start the backup job and leave it running, exporting the disks over "
        "NBD (no data is read, no checkpoint created); stop it with -k.",
    )
    debug.add_argument(
        "-k",
        "--killonly",
        action="store_true",
        help="Stop a backup job left running on the domain, then exit.",
    )
    add_common_args(parser).add_argument(
        "-L",
        "--syslog",
        action="store_true",
        help="Also send the log to syslog (/dev/log). (default: %(default)s)",
    )
    return parser


def options_from(args: argparse.Namespace) -> BackupOptions:
    if args.worker is not None and args.worker < 1:
        raise UsageError("--worker needs a number of at least 1")
    if args.compress is not None and not 0 <= args.compress <= 16:
        raise UsageError("--compress takes an lz4 level from 0 to 16")
    if args.compress is not None and args.type == "raw":
        raise UsageError("--compress applies to the stream type only, not to -t raw")
    return BackupOptions(
        domain=args.domain,
        level=args.level,
        output=args.output,
        uri=args.uri,
        user=args.user,
        password=libvirt_password(args),
        output_type=args.type,
        raw=args.raw,
        include=split_names(args.include),
        exclude=split_names(args.exclude),
        checkpoint_dir=args.checkpointdir,
        scratch_dir=args.scratchdir,
        socket_file=args.socketfile,
        compress=args.compress,
        workers=args.worker,
        progress=not (args.noprogress or args.quiet),
        sparse=not args.no_sparse_detection,
        printonly=args.printonly,
        threshold=args.threshold,
        start_domain=args.start_domain,
        pause=args.pause,
        qemu=args.qemu,
        startonly=args.startonly,
        freeze_mountpoints=split_names(args.freeze_mountpoint) or None,
        remote=remote_options(args),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cancel = install_signal_handlers("virtnbdbackup")
    lock: FolderLock | None = None
    early = EarlyRecords()
    try:
        opts = options_from(args)
        if not args.killonly and not opts.to_stdout:
            lock = lock_backup_folder(opts, args.level)
        if lock is not None and lock.stale:
            clear_killed_run(Path(opts.output), lock.stale, opts.cpt_file)
        if not args.killonly:
            opts.level = resolve_level(opts)
            if not opts.startonly:
                check_output_folder(opts)
        log_dir = Path(opts.meta_dir)
        make_private_dir(log_dir)
    except (VirtnbdError, OSError) as err:
        if lock is not None:
            lock.release()
        setup_logging(args, None, syslog=args.syslog)
        early.replay()
        log.error("%s", err)
        return EXIT_ERROR
    try:
        return _run(args, opts, cancel, lock, log_dir, early)
    finally:
        if lock is not None:
            lock.release()


def lock_backup_folder(opts: BackupOptions, level: str) -> FolderLock:
    """One backup at a time into a folder; made if missing, to hold the lock."""
    folder = Path(opts.output)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    try:
        make_private_dir(folder)
    except OSError as err:
        raise UsageError(f"cannot create backup folder {folder}: {err.strerror}") from None
    return FolderLock(
        folder,
        f"virtnbdbackup -l {level} of domain {opts.domain}",
        details={"domain": opts.domain, "level": level},
    ).acquire()


def _run(
    args: argparse.Namespace,
    opts: BackupOptions,
    cancel: Cancel,
    lock: FolderLock | None,
    log_dir: Path,
    early: EarlyRecords,
) -> int:
    stamp = datetime.now().strftime("%m%d%Y%H%M%S")
    # Named after the level asked for, as 2.x does: a cron line's -l auto
    # writes backup.auto.<date>.log whichever level it resolved to.
    log_file = None if args.killonly else str(log_dir / f"backup.{args.level}.{stamp}.log")
    if log_file:
        create_private(log_file)
    counter = setup_logging(args, log_file, syslog=args.syslog)
    early.replay()
    warn_command_line_password(args)
    log.info("virtnbdbackup %s, level %s", __version__, opts.level)
    if not opts.to_stdout and not args.killonly:
        log.info(
            "backup folder %s is mode %04o; its new files are created 0600 (2.47 left both "
            "to the umask)",
            opts.output,
            stat.S_IMODE(os.stat(opts.output).st_mode),
        )
    if args.level == "auto":
        log.info(
            "level auto: the folder %s a backup set", "holds" if opts.level == "inc" else "holds no"
        )

    if args.killonly:
        return run_job(lambda: kill_backup_job(opts), counter, args.strict)

    def job() -> None:
        target: Target = (
            ZipTarget(sys.stdout.buffer) if opts.to_stdout else DirectoryTarget(opts.output)
        )
        BackupJob(opts, target, cancel, lock=lock).run()
        if opts.to_stdout and log_file:
            log.info("backup finished")
            target.copy_file(Path(log_file).name, log_file)
        target.close()
        if not opts.to_stdout:
            log.info("backup finished: %s", opts.output)

    return run_job(job, counter, args.strict)


if __name__ == "__main__":
    sys.exit(main())
