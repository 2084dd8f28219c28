"""virtnbdfleet: back up the VMs of several hypervisors, and report on them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from .. import __version__
from ..adapters.nbdclient import DEFAULT_PORT
from ..errors import UsageError, VirtnbdError
from ..interrupts import Cancel
from ..jobs.fleet import (
    FleetRun,
    Outcome,
    Plan,
    human_bytes,
    peak_rss_kib,
    plan_jobs,
    retry_set,
)
from ..jobs.fleetconfig import (
    DEFAULT_JOBS,
    DEFAULT_NBD_PORTS,
    LEVELS,
    PERIODS,
    FleetConfig,
    HypervisorConfig,
    check_name,
    check_unique_hosts,
    default_host_name,
    load_config,
    parse_duration,
    tcp_transport,
)
from ..jobs.fleetselect import Selection, parse_selectors
from ..jobs.fleetstatus import VmStatus, fleet_status, human_age
from ..jobs.remote import DEFAULT_TLS_DIR, RemoteOptions
from ..targets.fleetledger import LEDGER_NAME, JobRow, Ledger
from ..targets.private import create_private, make_private_dir
from .common import (
    DATE_FORMAT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_WARNINGS,
    LOG_FORMAT,
    PASSWORD_ENV,
    WarningCounter,
    add_compress_arg,
    install_signal_handlers,
    libvirt_password,
    setup_logging,
    warn_command_line_password,
)

log = logging.getLogger("virtnbdfleet")

# Test hook: the time the run (its periods) and status (ages) take as now,
# as an ISO 8601 date/time or Unix epoch.
NOW_ENV = "VIRTNBDFLEET_NOW"

EXAMPLES = """\
examples:
  # every VM of this host into /backup/HOST/VM/YYYY-MM, two at a time:
  virtnbdfleet backup -o /backup --all
  # web and db VMs of two hypervisors, at most 4 at once and 1 per hypervisor:
  virtnbdfleet backup -o /backup -U qemu+ssh://root@hv1/system -U qemu+ssh://root@hv2/system \\
      --select 'web*' --select 're:^db[0-9]+$' --jobs 4 --host-jobs 1
  # what the configuration selects, backing up nothing:
  virtnbdfleet backup -c /etc/virtnbdfleet.toml -n
  # again, only the VMs whose last backup failed:
  virtnbdfleet backup -c /etc/virtnbdfleet.toml --retry-failed
  # per VM: age and size of the last good backup, the last failure:
  virtnbdfleet status -o /backup
  # monitoring: exit 1 when a VM has no good backup of the last 26 hours:
  virtnbdfleet status -o /backup --max-age 26h --json
"""


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("give a number of at least 1")
    return value


def _logging_args(parser: argparse.ArgumentParser, strict: bool) -> None:
    group = parser.add_argument_group("Logging options")
    group.add_argument("-v", "--verbose", action="store_true", help="Enable debug output.")
    group.add_argument("--quiet", action="store_true", help="Log only errors to the console.")
    if strict:
        group.add_argument(
            "-e",
            "--strict",
            action="store_true",
            help="Exit with code 2 when a VM's backup or the run logged warnings. "
            "(default: %(default)s)",
        )


def _selection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Selection",
        "PATTERN is a domain name, a glob (web*), re:EXPR (a regular expression searched in "
        "the name) or tag:NAME (a tag in the domain's fleet metadata).",
    )
    group.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="PATTERN",
        help="Back up the domains PATTERN matches; repeat for more.",
    )
    group.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="Leave out the domains PATTERN matches, even when selected.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtnbdfleet",
        description="Back up the virtual machines of several hypervisors and report on them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backup = commands.add_parser(
        "backup",
        help="Back up the selected VMs into ROOT/HOST/VM/PERIOD.",
        description="Back up the selected VMs, each with virtnbdbackup -l auto into "
        "ROOT/HOST/VM/PERIOD (a full backup when the period starts), within the limits.",
    )
    opt = backup.add_argument_group("General options")
    opt.add_argument("-o", "--output", metavar="ROOT", help="Backup root. (default: output in -c)")
    opt.add_argument("-c", "--config", metavar="FILE", help="Fleet configuration (TOML).")
    opt.add_argument(
        "-U",
        "--uri",
        action="append",
        default=[],
        metavar="URI",
        help="A hypervisor's libvirt URI; repeat for more. (default: the hypervisors of -c, "
        "else qemu:///system)",
    )
    opt.add_argument("--all", action="store_true", help="Back up every domain.")
    opt.add_argument(
        "--jobs",
        type=positive,
        default=None,
        metavar="N",
        help=f"VMs backed up at once, all hypervisors. (default: {DEFAULT_JOBS})",
    )
    opt.add_argument(
        "--host-jobs",
        type=positive,
        default=None,
        metavar="N",
        help="VMs backed up at once per hypervisor. (default: --jobs)",
    )
    opt.add_argument(
        "-l",
        "--level",
        choices=LEVELS,
        default=None,
        help="auto: a full backup into each new period folder, inc after; diff: diff after; "
        "full, copy: a new folder ROOT/HOST/VM/TIMESTAMP each run. (default: auto)",
    )
    opt.add_argument(
        "--period",
        choices=PERIODS,
        default=None,
        help="How often a new folder, with a new full backup, starts. (default: monthly)",
    )
    add_compress_arg(opt)
    opt.add_argument(
        "--scratchdir", default=None, help="Scratch folder of the backup jobs. (default: /var/tmp)"
    )
    opt.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="Print the VMs selected, with level and folder, and back up nothing.",
    )
    opt.add_argument(
        "--retry-failed",
        action="store_true",
        help="Back up only the selected VMs whose last backup failed or was cut short.",
    )
    _selection_args(backup)
    remote = backup.add_argument_group(
        "Remote options", "For the hypervisors of -U; -c sets them per hypervisor."
    )
    remote.add_argument("--user", default=None, help="User to authenticate to libvirt with.")
    remote.add_argument(
        "--password",
        default=None,
        help="Password to authenticate with. Every user of this host sees it in the process "
        f"list: prefer --password-file or ${PASSWORD_ENV}.",
    )
    remote.add_argument(
        "--password-file",
        default=None,
        metavar="FILE",
        help="Read the password from the first line of FILE. (default: "
        f"${PASSWORD_ENV} if set) Each backup gets it in its environment, not its "
        "command line.",
    )
    remote.add_argument("--ssh-user", default=None, help="User to log in with over SSH.")
    remote.add_argument("--ssh-port", type=int, default=None, help="SSH port.")
    remote.add_argument(
        "--ssh-private-key", default=None, metavar="FILE", help="Private key for SSH."
    )
    remote.add_argument(
        "-P",
        "--nbd-port",
        type=int,
        default=None,
        help="NBD over TCP, as in virtnbdbackup 2.x: the first port of the NBD servers; "
        "each job running at once gets its own ports from here. (default: NBD over "
        f"each job's SSH connection, no port; {DEFAULT_PORT} with -I or --tls)",
    )
    remote.add_argument(
        "--nbd-ports",
        type=positive,
        default=DEFAULT_NBD_PORTS,
        metavar="N",
        help="How many ports from --nbd-port the jobs of a hypervisor may use. "
        "(default: %(default)s)",
    )
    remote.add_argument("-I", "--nbd-ip", default=None, help="Address the NBD servers listen on.")
    remote.add_argument("--tls", action="store_true", help="NBD over TLS. (default: %(default)s)")
    remote.add_argument(
        "--tls-cert",
        default=DEFAULT_TLS_DIR,
        metavar="DIR",
        help="Folder of the TLS certificates. (default: %(default)s)",
    )
    _logging_args(backup, strict=True)

    status = commands.add_parser(
        "status",
        help="Per VM, the last good backup and the last failure, from the ledger.",
        description="Print, per VM in the ledger of ROOT, the age and size of its last good "
        "backup and its last failure.",
    )
    sopt = status.add_argument_group("General options")
    sopt.add_argument("-o", "--output", metavar="ROOT", help="Backup root. (default: output in -c)")
    sopt.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="Fleet configuration: its root, hypervisors and selection.",
    )
    sopt.add_argument("--json", action="store_true", help="Print JSON, for monitoring.")
    sopt.add_argument(
        "--max-age",
        default=None,
        metavar="DURATION",
        help="Exit 1 when a selected VM has no good backup this recent (26h, 90m, 2d, 1w).",
    )
    _selection_args(status)
    _logging_args(status, strict=False)
    return parser


def now_from_env() -> float:
    text = os.environ.get(NOW_ENV)
    if not text:
        return time.time()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(f"{NOW_ENV}={text!r}: give an ISO 8601 time or a Unix epoch") from None


def fleet_config(args: argparse.Namespace) -> FleetConfig:
    config = load_config(Path(args.config)) if args.config else FleetConfig()
    if args.output:
        config.output = Path(args.output)
    if config.output is None:
        raise UsageError("give the backup root: -o ROOT (or output = ... in the configuration)")
    config.selection = config.selection + Selection(
        parse_selectors(args.select),
        parse_selectors(args.exclude),
        bool(getattr(args, "all", False)),
    )
    if args.command != "backup":
        return config
    known = {h.uri for h in config.hypervisors}
    for uri in args.uri:
        if uri in known:
            continue
        known.add(uri)
        config.hypervisors.append(
            HypervisorConfig(
                uri=uri,
                name=check_name("hypervisor name", default_host_name(uri)),
                user=args.user,
                password=libvirt_password(args),
                remote=RemoteOptions(
                    ssh_user=args.ssh_user,
                    ssh_port=args.ssh_port,
                    ssh_key=args.ssh_private_key,
                    nbd_port=args.nbd_port or DEFAULT_PORT,
                    nbd_ip=args.nbd_ip,
                    tls=args.tls,
                    tls_cert=args.tls_cert,
                    over_ssh=not tcp_transport(args.nbd_port, args.nbd_ip, args.tls),
                ),
                nbd_ports=args.nbd_ports,
            )
        )
    if not config.hypervisors:
        config.hypervisors.append(HypervisorConfig("qemu:///system", "localhost"))
    check_unique_hosts(config.hypervisors)
    if args.jobs:
        config.jobs = args.jobs
    if args.host_jobs:
        config.host_jobs = args.host_jobs
    changes: dict[str, object] = {}
    if args.level:
        changes["level"] = args.level
    if args.period:
        changes["period"] = args.period
    if args.compress is not None:
        if not 0 <= args.compress <= 16:
            raise UsageError("--compress takes an lz4 level from 0 to 16")
        changes["compress"] = args.compress
    config.defaults = config.defaults.updated(changes)
    if args.scratchdir:
        config.scratchdir = args.scratchdir
    config.strict = config.strict or args.strict
    if all(config.selection_for(h).is_empty for h in config.hypervisors):
        raise UsageError(
            "nothing is selected: give --select PATTERN or --all (or select/all in the "
            "configuration)"
        )
    return config


def add_log_file(path: Path) -> None:
    create_private(path)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    logging.getLogger().addHandler(handler)


def run_backup(args: argparse.Namespace) -> int:
    counter = setup_logging(args, None)
    cancel = install_signal_handlers("virtnbdfleet")
    warn_command_line_password(args)
    try:
        config = fleet_config(args)
        assert config.output is not None
        now = datetime.fromtimestamp(now_from_env())
        ledger = None
        retry = None
        if not args.dry_run:
            make_private_dir(config.output)
            ledger = Ledger(config.output)
        elif args.retry_failed and (config.output / LEDGER_NAME).is_file():
            ledger = Ledger(config.output, create=False)  # a dry run writes nothing
        if args.retry_failed:
            retry = retry_set(ledger) if ledger is not None else set()
        plan = plan_jobs(config, now, retry=retry)
    except (VirtnbdError, OSError) as err:
        log.error("%s", err)
        return EXIT_ERROR
    if args.dry_run:
        for job in plan.jobs:
            print(f"{job.label}\t{job.level}\t{job.folder}")
        for failure in plan.failures:
            log.error("hypervisor %s: %s", failure.host.name, failure.message)
        for vm_failure in plan.vm_failures:
            log.error("%s/%s: %s", vm_failure.host.name, vm_failure.vm.name, vm_failure.message)
        return EXIT_ERROR if plan.failures or plan.vm_failures else EXIT_OK
    assert ledger is not None
    if not plan.jobs and not plan.failures and not plan.vm_failures:
        if retry is not None:
            log.info("--retry-failed: no selected VM failed in its last backup")
        else:
            log.warning("no domain matches the selection")
    with cancel.scope():
        # From here a signal only sets the event: the run loop stops every
        # job, waits for them and records it all before exiting.
        cancel.defer()
        return _run(args, config, ledger, plan, cancel, counter)


def _run(
    args: argparse.Namespace,
    config: FleetConfig,
    ledger: Ledger,
    plan: Plan,
    cancel: Cancel,
    counter: WarningCounter,
) -> int:
    run_id = ledger.start_run(time.time(), redacted(sys.argv), config.jobs)
    runner = FleetRun(config, ledger, run_id, cancel)
    make_private_dir(runner.log_dir)
    add_log_file(runner.log_dir / "fleet.log")
    log.info(
        "virtnbdfleet %s, run %d: %d VM(s) of %d hypervisor(s), %d at once; logs in %s",
        __version__,
        run_id,
        len(plan.jobs),
        len(config.hypervisors),
        config.jobs,
        runner.log_dir,
    )
    try:
        runner.record_host_failures(plan.failures)
        runner.record_vm_failures(plan.vm_failures)
        outcomes = runner.run(plan.jobs)
    except VirtnbdError as err:
        log.error("%s", err)
        outcomes = [*runner.outcomes, Outcome("run", "failed", str(err))]
    code, summary = exit_code(outcomes, counter.count, config.strict, cancel.is_set())
    state = "interrupted" if cancel.is_set() else "done"
    ledger.end_run(run_id, time.time(), state, code, peak_rss_kib(), summary)
    ledger.close()
    (log.info if code == EXIT_OK else log.error)("%s", summary)
    return code


def redacted(argv: list[str]) -> list[str]:
    """The command line for the ledger, without a --password."""
    out = list(argv)
    for i, word in enumerate(out):
        if word == "--password" and i + 1 < len(out):
            out[i + 1] = "***"
        elif word.startswith("--password="):
            out[i] = "--password=***"
    return out


def exit_code(
    outcomes: list[Outcome], warnings: int, strict: bool, interrupted: bool
) -> tuple[int, str]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "nothing to do"
    summary = f"fleet run {'stopped' if interrupted else 'finished'}: {parts}"
    bad = sum(counts.get(s, 0) for s in ("failed", "interrupted", "cancelled"))
    if bad or interrupted:
        return EXIT_ERROR, summary
    if strict and (counts.get("warning", 0) or warnings):
        return EXIT_WARNINGS, f"{summary}; warnings and --strict given"
    return EXIT_OK, summary


def run_status(args: argparse.Namespace) -> int:
    setup_logging(args, None)
    try:
        config = fleet_config(args)
        assert config.output is not None
        max_age = parse_duration(args.max_age) if args.max_age else None
        now = now_from_env()
        ledger = Ledger(config.output, create=False)
    except (VirtnbdError, OSError) as err:
        log.error("%s", err)
        return EXIT_ERROR
    hosts = {h.name for h in config.hypervisors} or None
    rows = fleet_status(ledger, config.selection, hosts)
    ledger.close()
    stale = [r for r in rows if r.vm and not fresh(r.age(now), max_age)]
    if args.json:
        print(json.dumps({"now": now, "vms": [r.as_dict(now) for r in rows]}, indent=2))
    else:
        print_table(rows, now)
    if max_age is None:
        return EXIT_OK
    if stale:
        for row in stale:
            log.error(
                "%s/%s: %s",
                row.hypervisor,
                row.vm,
                "no good backup"
                if row.age(now) is None
                else f"last good backup {human_age(row.age(now))} ago, older than {args.max_age}",
            )
        return EXIT_ERROR
    return EXIT_OK


def fresh(age: float | None, max_age: float | None) -> bool:
    return age is not None and (max_age is None or age <= max_age)


def print_table(rows: list[VmStatus], now: float) -> None:
    header = ("HOST", "VM", "STATE", "LAST GOOD", "AGE", "SIZE", "LAST FAILURE")
    lines = [header]
    for row in rows:
        good = row.last_good
        fail = row.last_failure
        lines.append(
            (
                row.hypervisor,
                row.vm or "(hypervisor)",
                row.state,
                _when(good.ended) if good else "-",
                human_age(row.age(now)) if good else "never",
                human_bytes(good.bytes or 0) if good else "-",
                _failure(fail),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])]
        print("  ".join([*cells, line[-1]]).rstrip())


def _failure(row: JobRow | None) -> str:
    if row is None:
        return "-"
    return f"{_when(row.ended or row.started)} {row.state}: {row.message}"


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "backup":
        return run_backup(args)
    return run_status(args)


if __name__ == "__main__":
    sys.exit(main())
