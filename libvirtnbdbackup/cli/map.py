"""virtnbdmap: map a backup chain to a block device, an NBD export, or a VM."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import UsageError
from ..jobs.map import MapJob, MapOptions, stop_running
from .common import (
    EXIT_ERROR,
    add_common_args,
    add_connection_args,
    install_signal_handlers,
    libvirt_password,
    run_job,
    setup_logging,
    warn_command_line_password,
)

log = logging.getLogger("virtnbdmap")

EXAMPLES = """\
examples:
  # a full backup as a block device (/dev/nbd0, or a loop device without nbd):
  virtnbdmap -f /backup/webvm/vda.full.data
  # full + incrementals, in chain order:
  virtnbdmap -f /backup/webvm/vda.full.data,/backup/webvm/vda.inc.virtnbdbackup.1.data
  # the state of checkpoint virtnbdbackup.1 of disk vda, from the backup folder:
  virtnbdmap -i /backup/webvm --disk vda --until virtnbdbackup.1
  # serve it only, for qemu-img, nbdcopy, guestfish or QEMU:
  virtnbdmap -i /backup/webvm --disk vda --listen unix:/run/vda.sock
  # boot the backup as a transient VM whose writes go to qcow2 overlays:
  virtnbdmap -i /backup/webvm --boot
  # unmap what a running virtnbdmap mapped:
  virtnbdmap --stop
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtnbdmap",
        description="Map backup data files to a block device or an NBD export, "
        "or boot them as a VM, without restoring them first.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt = parser.add_argument_group("General options")
    opt.add_argument(
        "-f",
        "--file",
        action="append",
        default=[],
        metavar="FILE[,FILE...]",
        help="Data files to map, a full or copy file first, then incrementals in chain order.",
    )
    opt.add_argument("-i", "--input", default=None, help="Backup folder to map a chain from.")
    opt.add_argument("--disk", default=None, help="With -i: the disk to map (e.g. vda).")
    opt.add_argument(
        "--until",
        default=None,
        metavar="CHECKPOINT",
        help="With -i: map the state of this checkpoint.",
    )
    opt.add_argument(
        "-d",
        "--device",
        default=None,
        help="/dev/nbdN, or 'loop' for a loop device over nbdfuse. "
        "(default: /dev/nbd0 where the kernel has nbd, else loop)",
    )
    opt.add_argument(
        "-e", "--export-name", default=None, help="NBD export name. (default: the disk name)"
    )
    opt.add_argument(
        "-b",
        "--blocksize",
        type=int,
        default=None,
        help="Largest request in bytes passed to the nbdkit plugin (bigger ones are split by "
        "nbdkit's blocksize filter). (default: no limit; virtnbdbackup 2.x used 4096)",
    )
    opt.add_argument(
        "-H",
        "--hexdump",
        action="store_true",
        help="Log every read (offset, length, first bytes in hex) to the -L log file, "
        "or ~/virtnbdmap.log, for debugging. (default: %(default)s)",
    )
    opt.add_argument(
        "-t",
        "--threads",
        type=int,
        default=1,
        help="nbdkit threads per client connection; 0 for nbdkit's default of 16. "
        "The plugin is Python code: one thread per connection serves a chain "
        "fastest. (default: %(default)s)",
    )
    opt.add_argument(
        "--listen",
        default=None,
        metavar="unix:PATH|HOST:PORT",
        help="Only serve the export there (no block device); runs until Ctrl-C or --stop.",
    )
    opt.add_argument(
        "-l",
        "--listen-address",
        default=None,
        help="Serve the export on this TCP address too (the device connects through it).",
    )
    opt.add_argument(
        "-p", "--listen-port", type=int, default=None, help="TCP port with -l. (default: 10809)"
    )
    opt.add_argument(
        "--tls",
        action="store_true",
        help="Serve the --listen HOST:PORT export with TLS; clients need a certificate signed "
        "by the same CA. (default: %(default)s)",
    )
    opt.add_argument(
        "--tls-cert",
        default="/etc/pki/qemu",
        metavar="DIR",
        help="Folder of ca-cert.pem, server-cert.pem and server-key.pem for --tls. "
        "(default: %(default)s)",
    )
    opt.add_argument(
        "--insecure",
        action="store_true",
        help="Allow a TCP listener on an address other than loopback without --tls: anyone "
        "who reaches it reads the backup. (default: %(default)s)",
    )
    opt.add_argument(
        "-r",
        "--readonly",
        action="store_true",
        help="Refuse writes. Otherwise writes go to a temporary copy-on-write layer, "
        "never to the backup files.",
    )
    opt.add_argument(
        "--cache",
        default=None,
        metavar="SIZE",
        help="Memory for decompressed pieces of compressed backups. (default: 256M)",
    )
    opt.add_argument(
        "--boot",
        action="store_true",
        help="Start a transient VM from the saved domain XML, its disks qcow2 overlays "
        "on the mapped exports.",
    )
    opt.add_argument(
        "-o", "--output", default=None, help="With --boot: folder for the overlays (kept)."
    )
    opt.add_argument(
        "-N", "--name", default=None, help="With --boot: domain name. (default: virtnbdmap_NAME)"
    )
    opt.add_argument(
        "--stop",
        action="store_true",
        help="Unmap what running virtnbdmap instances mapped (only -d DEVICE's or "
        "-e NAME's when given) and exit.",
    )
    opt.add_argument(
        "-n",
        "--noprogress",
        action="store_true",
        help="Accepted for compatibility; virtnbdmap shows no progress bar.",
    )
    add_connection_args(parser)
    add_common_args(parser, strict_short=False, logfile_of="virtnbdmap")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.blocksize is not None and (
        args.blocksize < 512 or args.blocksize & (args.blocksize - 1)
    ):
        parser.error("-b/--blocksize takes a power of two of at least 512 bytes")
    counter = setup_logging(args, args.logfile)
    warn_command_line_password(args)
    try:
        password = libvirt_password(args)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_ERROR

    if args.stop:

        def stop() -> None:
            count = stop_running(args.device, args.export_name)
            log.info("stopped %d virtnbdmap instance(s)", count)

        return run_job(stop, counter, args.strict)

    files = [name.strip() for value in args.file for name in value.split(",") if name.strip()]
    if not files and not args.input:
        parser.error("give the data files with -f, or a backup folder with -i")
    if args.listen and (args.boot or args.device):
        parser.error("--listen serves only: it does not go with --boot or -d")
    if args.boot and args.device:
        parser.error("--boot needs no block device: leave out -d")

    cancel = install_signal_handlers("virtnbdmap")
    log.info("virtnbdmap %s", __version__)
    opts = MapOptions(
        files=files,
        input=args.input,
        disk=args.disk,
        until=args.until,
        device=args.device,
        export_name=args.export_name,
        listen=args.listen,
        listen_address=args.listen_address,
        listen_port=args.listen_port,
        tls=args.tls,
        tls_cert=args.tls_cert,
        insecure=args.insecure,
        readonly=args.readonly,
        threads=args.threads,
        cache=args.cache,
        blocksize=args.blocksize,
        hexdump=(args.logfile or os.path.expanduser("~/virtnbdmap.log")) if args.hexdump else None,
        boot=args.boot,
        output=args.output,
        name=args.name,
        uri=args.uri,
        user=args.user,
        password=password,
    )
    return run_job(lambda: MapJob(opts, cancel).run(), counter, args.strict)


if __name__ == "__main__":
    sys.exit(main())
