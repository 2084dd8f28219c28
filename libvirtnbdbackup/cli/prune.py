"""virtnbdprune: thin out backup folders by keep rules, merging instead of breaking chains."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .. import __version__
from ..errors import UsageError
from ..jobs.backupset import scan
from ..jobs.keeprules import KeepRules, parse_duration
from ..jobs.prune import Libvirt, prune
from ..jobs.pruneplan import PROTECT_SUFFIX, backup_folders
from ..targets.private import create_private
from .common import (
    add_common_args,
    add_connection_args,
    install_signal_handlers,
    libvirt_password,
    run_job,
    setup_logging,
)

log = logging.getLogger("virtnbdprune")

EXAMPLES = """\
examples:
  # show what keeping 7 daily, 4 weekly and 6 monthly points would do:
  virtnbdprune -i /backup/webvm --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run
  # keep the last 10 backups of a folder, merging older ones into the full:
  virtnbdprune -i /backup/webvm --keep-last 10
  # a root of monthly folders (/backup/webvm/2026-11, /backup/webvm/2026-12, ...):
  virtnbdprune -i /backup/webvm --keep-within 14d --keep-monthly 12
  # never prune the backup with checkpoint virtnbdbackup.3:
  virtnbdprune -i /backup/webvm --protect virtnbdbackup.3
"""


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtnbdprune",
        description="Remove old backups of virtnbdbackup backup sets by keep rules; backups "
        "that kept ones depend on are merged into a new full backup instead of breaking "
        "the chain.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt = parser.add_argument_group("General options")
    opt.add_argument(
        "-i",
        "--input",
        required=True,
        help="A backup folder, or a folder of backup folders (e.g. one per month).",
    )
    rules = parser.add_argument_group(
        "Keep rules", "A backup is kept when any rule keeps it; at least one rule is needed."
    )
    rules.add_argument("--keep-last", type=count, default=0, metavar="N", help="Keep the N newest.")
    for name, unit in (
        ("daily", "day"),
        ("weekly", "week"),
        ("monthly", "month"),
        ("yearly", "year"),
    ):
        rules.add_argument(
            f"--keep-{name}",
            type=count,
            default=0,
            metavar="N",
            help=f"Keep the newest backup of each of the N newest {unit}s that have one.",
        )
    rules.add_argument(
        "--keep-within",
        default=None,
        metavar="DURATION",
        help="Keep every backup taken within DURATION before the newest one, e.g. 14d, "
        "2w, 6m, 1y, 36h.",
    )
    opt.add_argument(
        "--protect",
        default=None,
        metavar="POINT",
        help=f"Mark the backup POINT (checkpoint name or diff epoch) of the folder as "
        f"protected (file POINT{PROTECT_SUFFIX}): always kept. Then prune as asked, if "
        "rules are given.",
    )
    opt.add_argument(
        "--unprotect", default=None, metavar="POINT", help="Remove the protect mark of POINT."
    )
    opt.add_argument(
        "--dry-run",
        action="store_true",
        help="Change nothing; print what would be kept, merged and removed, and why.",
    )
    opt.add_argument(
        "--verify",
        action="store_true",
        help="Compare every byte of a merged full backup with the chain it replaces, not "
        "only its extent map and a sample. (default: %(default)s)",
    )
    opt.add_argument("-n", "--noprogress", action="store_true", help="Disable progress bars.")
    add_connection_args(parser)
    add_common_args(parser)
    return parser


def rules_of(args: argparse.Namespace) -> KeepRules:
    return KeepRules(
        last=args.keep_last,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
        within=parse_duration(args.keep_within) if args.keep_within is not None else None,
    )


def mark(root: str, point: str, protect: bool) -> None:
    folders = backup_folders(Path(root))
    if len(folders) != 1:
        raise UsageError(
            f"{root} holds {len(folders)} backup folders: give the folder of {point} with -i"
        )
    folder = folders[0]
    if point not in {f.ident for f in scan(folder)}:
        raise UsageError(f"{folder} holds no backup {point}")
    marker = folder / f"{point}{PROTECT_SUFFIX}"
    if protect:
        create_private(marker)
        log.info("%s is protected (%s)", point, marker)
    else:
        marker.unlink(missing_ok=True)
        log.info("%s is no longer protected", point)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    counter = setup_logging(args, None)
    install_signal_handlers("virtnbdprune")

    def job() -> None:
        log.info("virtnbdprune %s", __version__)
        if args.protect:
            mark(args.input, args.protect, True)
        if args.unprotect:
            mark(args.input, args.unprotect, False)
        rules = rules_of(args)
        if rules.empty and (args.protect or args.unprotect):
            return
        connection = Libvirt(args.uri, args.user, libvirt_password(args))
        result = prune(
            args.input, rules, dry_run=args.dry_run, verify=args.verify, libvirt=connection
        )
        if args.dry_run or not args.quiet:
            print(result.plan.table())
        if not args.dry_run:
            log.info(
                "prune finished: %d backups merged, %d removed, %d bytes written",
                sum(len(f.merged) for f in result.plan.folders),
                sum(len(f.removed) for f in result.plan.folders),
                result.merged_bytes,
            )

    return run_job(job, counter, args.strict)


if __name__ == "__main__":
    sys.exit(main())
