"""What the commands share: logging, signals and exit codes.

Exit codes: 0 success, 1 any error, 2 with ``--strict`` when warnings were
logged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable

from .. import __version__, interrupts
from ..adapters.nbdclient import DEFAULT_PORT
from ..errors import Interrupted, UsageError, VirtnbdError
from ..interrupts import Cancel, Stopped
from ..jobs.remote import DEFAULT_TLS_DIR, RemoteOptions

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_WARNINGS = 2

LOG_FORMAT = "%(asctime)s %(levelname)s %(module)s - %(funcName)s [%(threadName)s]: %(message)s"
CONSOLE_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s]: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

log = logging.getLogger("virtnbdbackup")

PASSWORD_ENV = "VIRTNBDBACKUP_PASSWORD"
# -L/--syslog sends the log here too; the variable points it elsewhere (tests).
SYSLOG_SOCKET = os.environ.get("VIRTNBDBACKUP_SYSLOG_SOCKET", "/dev/log")


class WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


class EarlyRecords(logging.Handler):
    """Holds what is logged before logging is set up (a backup locks its
    folder and puts right what a killed run left before it knows its log
    file's name); ``replay`` hands it to the handlers set up since."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        root = logging.getLogger()
        root.addHandler(self)
        root.setLevel(logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        logging.getLogger().removeHandler(self)
        records, self.records = self.records, []
        for record in records:
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)


class LogFile(logging.FileHandler):
    """The log file in the backup folder: when it cannot be written (the
    target is full), one warning on the console, then the console only."""

    def __init__(self, path: str) -> None:
        super().__init__(path, delay=True)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        reason = getattr(err, "strerror", None) or err
        with contextlib.suppress(OSError):
            self.close()
        logging.getLogger("virtnbdbackup").warning(
            "cannot write the log file %s (%s): logging to the console only",
            self.baseFilename,
            reason,
        )


def add_common_args(
    parser: argparse.ArgumentParser, *, strict_short: bool = True, logfile_of: str | None = None
) -> argparse._ArgumentGroup:
    """``strict_short``: whether ``-e`` means ``--strict`` (virtnbdmap uses it otherwise).
    ``logfile_of``: the program whose 2.x ``-L/--logfile`` to add (restore and map;
    virtnbdbackup's ``-L`` is ``--syslog``)."""
    group = parser.add_argument_group("Logging and debug options")
    group.add_argument("-v", "--verbose", action="store_true", help="Enable debug output.")
    group.add_argument(
        "--quiet", action="store_true", help="Log only errors to the console, no progress bars."
    )
    group.add_argument(
        *(["-e"] if strict_short else []),
        "--strict",
        action="store_true",
        help="Exit with code 2 when warnings were logged. (default: %(default)s)",
    )
    group.add_argument("-V", "--version", action="version", version=__version__)
    group.add_argument(
        "--nocolor",
        action="store_true",
        help="Accepted for compatibility with virtnbdbackup 2.x: the console log is never colored.",
    )
    if logfile_of:
        group.add_argument(
            "-L",
            "--logfile",
            default=None,
            metavar="FILE",
            help=f"Also write the log to FILE (virtnbdbackup 2.x wrote ~/{logfile_of}.log "
            "by default). (default: console only)",
        )
    return group


def add_compress_arg(opt: argparse._ActionsContainer) -> None:
    """``-z [LEVEL]``: lz4 streams, as virtnbdbackup and virtnbdfleet take it."""
    opt.add_argument(
        "-z",
        "--compress",
        nargs="?",
        type=int,
        const=2,
        default=None,
        metavar="LEVEL",
        help="Compress with lz4 at LEVEL. (default: off; 2 when LEVEL is left out)",
    )


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Connection options")
    group.add_argument(
        "-U",
        "--uri",
        default="qemu:///system",
        help="libvirt connection URI. (default: %(default)s)",
    )
    group.add_argument("--user", default=None, help="User to authenticate to libvirt with.")
    group.add_argument(
        "--password",
        default=None,
        help="Password to authenticate with. Every user of this host sees it in the process "
        f"list: prefer --password-file or ${PASSWORD_ENV}.",
    )
    group.add_argument(
        "--password-file",
        default=None,
        metavar="FILE",
        help="Read the password to authenticate with from the first line of FILE "
        f"(keep it mode 0600). (default: ${PASSWORD_ENV} if set)",
    )


def libvirt_password(args: argparse.Namespace) -> str | None:
    """The libvirt password: --password, else --password-file, else the
    environment variable. Only the first is visible to other users."""
    if args.password is not None:
        return str(args.password)
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as fh:
                return fh.readline().rstrip("\r\n")
        except OSError as err:
            raise UsageError(
                f"--password-file {args.password_file}: cannot read it: {err.strerror}"
            ) from None
    return os.environ.get(PASSWORD_ENV)


def warn_command_line_password(args: argparse.Namespace) -> None:
    """Once logging is set up: say so when the password came on the command line."""
    if args.password is not None:
        log.warning(
            "--password on the command line can be read by every user of this host (ps, "
            "/proc/PID/cmdline): use --password-file FILE or the %s environment variable",
            PASSWORD_ENV,
        )


def add_remote_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Remote options", "Used when the -U URI names another host (qemu+ssh://root@hv1/system)."
    )
    group.add_argument(
        "--ssh-user",
        default=None,
        help="User to log in with over SSH, to run qemu tools and copy files. "
        "(default: the user in the URI, else your SSH configuration's)",
    )
    group.add_argument(
        "--ssh-port",
        type=int,
        default=None,
        help="SSH port. (default: the port of a qemu+ssh URI, else your SSH configuration's)",
    )
    group.add_argument(
        "--ssh-private-key",
        default=None,
        metavar="FILE",
        help="Private key for SSH. (default: the URI's keyfile, else your SSH configuration's)",
    )
    group.add_argument(
        "-P",
        "--nbd-port",
        type=int,
        default=None,
        help="Put the remote NBD server on this TCP port, unencrypted and unauthenticated "
        "unless --tls is given, as 2.47 did; give each backup or restore running at the "
        "same time its own (a shut-off domain uses one port per disk, from this one up). "
        f"(default: a unix socket forwarded over SSH; {DEFAULT_PORT} with -I or --tls)",
    )
    group.add_argument(
        "-I",
        "--nbd-ip",
        default=None,
        help="Put the remote NBD server on TCP at this address, e.g. on a dedicated backup "
        "network (plain NBD unless --tls is given). "
        "(default: the host of the URI, with -P or --tls)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="Transfer the disks over NBD on TCP with TLS (x509 certificates) instead of "
        "over SSH. (default: %(default)s)",
    )
    group.add_argument(
        "--tls-cert",
        default=DEFAULT_TLS_DIR,
        metavar="DIR",
        help="Folder of the TLS certificates: ca-cert.pem, client-cert.pem and client-key.pem "
        "here, ca-cert.pem, server-cert.pem and server-key.pem in the same folder on the "
        "hypervisor. (default: %(default)s)",
    )


def remote_options(args: argparse.Namespace) -> RemoteOptions:
    return RemoteOptions(
        ssh_user=args.ssh_user,
        ssh_port=args.ssh_port,
        ssh_key=args.ssh_private_key,
        nbd_port=DEFAULT_PORT if args.nbd_port is None else args.nbd_port,
        nbd_ip=args.nbd_ip,
        tls=args.tls,
        tls_cert=args.tls_cert,
        over_ssh=args.nbd_port is None and args.nbd_ip is None and not args.tls,
    )


def setup_logging(
    args: argparse.Namespace, log_file: str | None, *, syslog: bool = False
) -> WarningCounter:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT, DATE_FORMAT))
    console.setLevel(logging.ERROR if args.quiet else logging.NOTSET)
    root.addHandler(console)
    if log_file:
        handler = LogFile(log_file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        root.addHandler(handler)
    syslog_problem = None
    if syslog:
        try:
            sys_handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET)
        except OSError as err:
            syslog_problem = f"no syslog at {SYSLOG_SOCKET} ({err.strerror}): -L logs nothing"
        else:
            sys_handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s %(message)s"))
            root.addHandler(sys_handler)
    counter = WarningCounter()
    root.addHandler(counter)
    if syslog_problem:
        log.warning("%s", syslog_problem)
    return counter


def install_signal_handlers(prog: str) -> Cancel:
    """SIGINT and SIGTERM stop the job (``interrupts``); the event jobs poll."""
    return interrupts.install(prog)


def run_job(job: Callable[[], None], counter: WarningCounter, strict: bool) -> int:
    """Run ``job``; map its outcome to the exit code."""
    try:
        job()
    except Stopped as err:
        log.error("%s", err)
        return EXIT_ERROR
    except Interrupted as err:
        log.error("%s", err)
        return EXIT_ERROR
    except VirtnbdError as err:
        log.error("%s", err)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_ERROR
    except Exception:
        log.exception("unexpected error; please report it with the log above")
        return EXIT_ERROR
    if strict and counter.count:
        log.error("%d warning(s) logged and --strict given", counter.count)
        return EXIT_WARNINGS
    return EXIT_OK
