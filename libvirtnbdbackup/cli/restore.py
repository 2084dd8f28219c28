"""virtnbdrestore: restore disk images from a backup set."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import UsageError
from ..jobs.restore import RestoreJob, RestoreOptions, dump_json, verify
from .common import (
    EXIT_ERROR,
    add_common_args,
    add_connection_args,
    add_remote_args,
    install_signal_handlers,
    libvirt_password,
    remote_options,
    run_job,
    setup_logging,
    warn_command_line_password,
)

log = logging.getLogger("virtnbdrestore")

EXAMPLES = """\
examples:
  # restore every disk of a backup set into qcow2 images:
  virtnbdrestore -i /backup/webvm -o /var/lib/libvirt/images/restored
  # restore the state of the first incremental backup:
  virtnbdrestore -i /backup/webvm -o /tmp/restored --until virtnbdbackup.1
  # show what the backup set holds:
  virtnbdrestore -i /backup/webvm -o dump
  # check every data file against its saved checksum:
  virtnbdrestore -i /backup/webvm -o verify
  # restore onto hypervisor hv1 and define the domain there:
  virtnbdrestore -U qemu+ssh://root@hv1/system -i /backup/webvm -o /var/lib/libvirt/images/r -D
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtnbdrestore",
        description="Restore virtual machine disks from a virtnbdbackup backup set.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt = parser.add_argument_group("General options")
    opt.add_argument("-i", "--input", required=True, help="Folder holding the backup set.")
    opt.add_argument(
        "-o",
        "--output",
        required=True,
        help="Folder to restore into; 'dump' prints the backup set's metadata; "
        "'verify' checks the data files' checksums.",
    )
    opt.add_argument("-d", "--disk", default=None, help="Restore only this disk (e.g. vda).")
    opt.add_argument(
        "-r",
        "--raw",
        action="store_true",
        help="Restore raw-format disks too (copied as raw images). (default: %(default)s)",
    )
    opt.add_argument(
        "--until",
        default=None,
        metavar="CHECKPOINT",
        help="Restore the state of this checkpoint (see -o dump for checkpointName).",
    )
    opt.add_argument(
        "--sequence",
        default=None,
        metavar="FILE,FILE",
        help="Apply exactly these data files, a full or copy file first.",
    )
    opt.add_argument(
        "-c",
        "--adjust-config",
        action="store_true",
        help="Adjust the saved domain XML to the restored images: new name, no UUID, "
        "disk paths changed, backing stores and left-out disks removed.",
    )
    opt.add_argument(
        "-D",
        "--define",
        action="store_true",
        help="Define the adjusted domain in libvirt (implies -c).",
    )
    opt.add_argument(
        "-N", "--name", default=None, help="Name of the restored domain. (default: restore_NAME)"
    )
    opt.add_argument(
        "-A",
        "--preallocate",
        action="store_true",
        help="Preallocate the metadata of the restored qcow2 images.",
    )
    opt.add_argument(
        "--compress",
        action="store_true",
        help="Write the restored qcow2 images with compressed clusters (slower; needs room "
        "for an uncompressed working copy while it runs).",
    )
    opt.add_argument("-n", "--noprogress", action="store_true", help="Disable progress bars.")
    add_connection_args(parser)
    add_remote_args(parser)
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compress and args.preallocate:
        parser.error("--compress and -A/--preallocate exclude each other")
    counter = setup_logging(args, None)
    warn_command_line_password(args)
    try:
        password = libvirt_password(args)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_ERROR
    cancel = install_signal_handlers("virtnbdrestore")

    if args.output == "dump":
        return run_job(lambda: print(dump_json(args.input)), counter, args.strict)
    if args.output == "verify":
        return run_job(lambda: verify(args.input), counter, args.strict)

    log.info("virtnbdrestore %s", __version__)
    opts = RestoreOptions(
        input=args.input,
        output=args.output,
        disk=args.disk,
        raw=args.raw,
        progress=not (args.noprogress or args.quiet),
        until=args.until,
        adjust_config=args.adjust_config,
        define=args.define,
        name=args.name,
        preallocate=args.preallocate,
        compress=args.compress,
        uri=args.uri,
        user=args.user,
        password=password,
        sequence=[n.strip() for n in args.sequence.split(",") if n.strip()]
        if args.sequence
        else None,
        remote=remote_options(args),
    )

    def job() -> None:
        RestoreJob(opts, cancel).run()
        log.info("restore finished: %s", opts.output)

    return run_job(job, counter, args.strict)


if __name__ == "__main__":
    sys.exit(main())
