"""virtnbdrestore: restore disk images from a backup set."""

from __future__ import annotations

import argparse
import logging
import os
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
    opt.add_argument(
        "-a",
        "--action",
        default="restore",
        choices=["dump", "restore", "verify"],
        help="What to do; -o dump and -o verify choose the same. (default: %(default)s)",
    )
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
        "-u",
        "--until",
        default=None,
        metavar="CHECKPOINT",
        help="Restore the state of this checkpoint (see -o dump for checkpointName).",
    )
    opt.add_argument(
        "-s",
        "--sequence",
        default=None,
        metavar="FILE,FILE",
        help="Apply exactly these data files, a full or copy file first; the image is "
        "named after the disk (e.g. sda).",
    )
    opt.add_argument(
        "-f",
        "--socketfile",
        default=None,
        help="Unix socket of the qemu-nbd that writes the images. (default: a private one)",
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
        "-C",
        "--config-file",
        default="vmconfig.xml",
        help="File name, in the output folder, of the domain XML the restore writes "
        "(adjusted with -c). (default: %(default)s)",
    )
    opt.add_argument(
        "-N", "--name", default=None, help="Name of the restored domain. (default: restore_NAME)"
    )
    opt.add_argument(
        "-B",
        "--buffsize",
        type=int,
        default=None,
        help="Read size in bytes of -o verify. (default: 4 MiB)",
    )
    opt.add_argument(
        "--dump-detail",
        action="store_true",
        help="With -o dump: add each file's name to its entry and list raw images too "
        "(without it, the output is virtnbdbackup 2.x's).",
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
    add_common_args(parser, logfile_of="virtnbdrestore")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compress and args.preallocate:
        parser.error("--compress and -A/--preallocate exclude each other")
    if args.buffsize is not None and args.buffsize < 1:
        parser.error("-B/--buffsize needs a positive number of bytes")
    if os.sep in args.config_file:
        parser.error("-C/--config-file names a file in the output folder, not a path")
    counter = setup_logging(args, args.logfile)
    warn_command_line_password(args)
    try:
        password = libvirt_password(args)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_ERROR
    cancel = install_signal_handlers("virtnbdrestore")
    sequence = [n.strip() for n in args.sequence.split(",") if n.strip()] if args.sequence else None

    action = args.output if args.output in ("dump", "verify") else args.action
    if action == "dump":
        return run_job(
            lambda: print(dump_json(args.input, args.disk, sequence, args.dump_detail)),
            counter,
            args.strict,
        )
    if action == "verify":
        buffsize = {"buffsize": args.buffsize} if args.buffsize else {}
        return run_job(lambda: verify(args.input, args.disk, **buffsize), counter, args.strict)

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
        sequence=sequence,
        socket_file=args.socketfile,
        config_file=args.config_file,
        remote=remote_options(args),
    )

    def job() -> None:
        RestoreJob(opts, cancel).run()
        log.info("restore finished: %s", opts.output)

    return run_job(job, counter, args.strict)


if __name__ == "__main__":
    sys.exit(main())
