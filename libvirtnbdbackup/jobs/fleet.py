"""A fleet run: the selected VMs of several hypervisors, each backed up by
its own virtnbdbackup process into ROOT/HOST/VM/PERIOD, within global and
per-hypervisor limits, each result in the ledger.

One process per VM isolates failures (a VM whose backup fails or hangs
does not touch the others) and keeps each backup's guarantees: on SIGINT
or SIGTERM every child gets SIGTERM and cleans up as a single backup does.
The scheduler itself is one thread polling its children.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..adapters.virt import DomainSummary, Hypervisor
from ..errors import UsageError, VirtnbdError
from ..targets.fleetledger import FAILED_STATES, Ledger
from ..targets.fleetlocks import PortLease, PortPool, lock_vm_folder
from ..targets.lock import FolderLock
from ..targets.private import make_private_dir, open_private
from .backupoptions import backup_set_files
from .fleetconfig import (
    FleetConfig,
    HypervisorConfig,
    Retention,
    VmSettings,
    check_name,
    period_name,
)

log = logging.getLogger("virtnbdfleet")

LOG_DIR_NAME = "virtnbdfleet.logs"
POLL_SECONDS = 0.1
# How long children get to clean up after SIGTERM before they are killed.
STOP_GRACE_SECONDS = 300
# The console scripts' launcher: signal handlers first, as for a user's run.
BACKUP_COMMAND = ("-m", "libvirtnbdbackup.cli.launch", "virtnbdbackup")
PRUNE_COMMAND = ("-m", "libvirtnbdbackup.cli.launch", "virtnbdprune")
PR_SET_PDEATHSIG = 1
# virtnbdbackup reads the libvirt password from there (cli/common.PASSWORD_ENV):
# a password on its command line would be seen by every user in ps.
PASSWORD_ENV = "VIRTNBDBACKUP_PASSWORD"


@dataclass
class PlannedJob:
    host: HypervisorConfig
    vm: DomainSummary
    settings: VmSettings
    vm_folder: Path  # ROOT/HOST/VM
    folder: Path  # the backup folder of this run
    period: str  # the period's name, or the run's time stamp for full and copy
    level: str  # the level virtnbdbackup is asked for

    @property
    def label(self) -> str:
        return f"{self.host.name}/{self.vm.name}"

    @property
    def ports_needed(self) -> int:
        """A running domain is served on one port, a shut-off one on one per disk."""
        return max(1, self.vm.disks)


@dataclass
class HostFailure:
    host: HypervisorConfig
    message: str


@dataclass
class VmFailure:
    host: HypervisorConfig
    vm: DomainSummary
    message: str


@dataclass
class Plan:
    jobs: list[PlannedJob] = field(default_factory=list)
    failures: list[HostFailure] = field(default_factory=list)
    vm_failures: list[VmFailure] = field(default_factory=list)


def job_folder(vm_folder: Path, settings: VmSettings, now: datetime) -> tuple[Path, str, str]:
    """(backup folder, period, level) of one VM's run.

    auto and diff take a full backup into the folder of the current period
    when it holds no backup set yet, and an inc (diff) on top otherwise;
    full and copy take a new folder named after the run's time each time.
    """
    if settings.level in ("full", "copy"):
        stamp = now.strftime("%Y-%m-%dT%H%M%S")
        return vm_folder / stamp, stamp, settings.level
    period = period_name(settings.period, now)
    folder = vm_folder / period
    if not backup_set_files(folder):
        return folder, period, "full"
    return folder, period, "inc" if settings.level == "auto" else "diff"


def plan_jobs(
    config: FleetConfig,
    now: datetime,
    *,
    retry: set[tuple[str, str]] | None = None,
    connect: Callable[[HypervisorConfig], list[DomainSummary]] | None = None,
) -> Plan:
    """The jobs of a run; hypervisors that cannot be listed become failures.

    ``retry``: only these (hypervisor, vm) pairs (--retry-failed).
    """
    assert config.output is not None
    list_domains = connect or _list_domains
    plan = Plan()
    for host in config.hypervisors:
        selection = config.selection_for(host)
        try:
            domains = list_domains(host)
        except VirtnbdError as err:
            plan.failures.append(HostFailure(host, str(err)))
            continue
        for name in selection.unmatched_names(d.name for d in domains):
            log.warning("hypervisor %s has no domain named %s", host.name, name)
        for vm in domains:
            if not selection.chooses(vm.name, vm.tags):
                continue
            if retry is not None and (host.name, vm.name) not in retry:
                continue
            settings = config.settings_for(host, vm.name)
            try:
                check_name("domain name", vm.name)
            except UsageError as err:
                plan.vm_failures.append(VmFailure(host, vm, str(err)))
                continue
            vm_folder = config.output / host.name / vm.name
            folder, period, level = job_folder(vm_folder, settings, now)
            plan.jobs.append(PlannedJob(host, vm, settings, vm_folder, folder, period, level))
    plan.jobs = interleave(plan.jobs)
    return plan


def _list_domains(host: HypervisorConfig) -> list[DomainSummary]:
    hypervisor = Hypervisor(host.uri, host.user, host.password)
    try:
        return hypervisor.list_domains()
    finally:
        hypervisor.close()


def interleave(jobs: list[PlannedJob]) -> list[PlannedJob]:
    """One job of each hypervisor in turn, so that no host waits for another's."""
    by_host: dict[str, list[PlannedJob]] = {}
    for job in jobs:
        by_host.setdefault(job.host.name, []).append(job)
    out: list[PlannedJob] = []
    queues = list(by_host.values())
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def retry_set(ledger: Ledger) -> set[tuple[str, str]]:
    """The VMs whose last job failed, was cut short or never started, or whose
    hypervisor could not be listed after their last job."""
    latest: dict[tuple[str, str], tuple[int, str]] = {}
    for job in ledger.jobs():
        latest[(job.hypervisor, job.vm)] = (job.id, job.state)
    out = set()
    for (host, vm), (job_id, state) in latest.items():
        if not vm:
            continue
        host_row = latest.get((host, ""))
        host_failed_later = host_row is not None and host_row[0] > job_id
        if state in FAILED_STATES or host_failed_later:
            out.add((host, vm))
    return out


def backup_command(job: PlannedJob, config: FleetConfig, port: int | None) -> list[str]:
    """The virtnbdbackup command line of one job."""
    s, host = job.settings, job.host
    argv = [sys.executable, *BACKUP_COMMAND, "-d", job.vm.name, "-l", job.level]
    argv += ["-o", str(job.folder), "-U", host.uri, "-n", "--strict"]
    if s.compress is not None:
        argv += ["-z", str(s.compress)]
    if s.include_disks:
        argv += ["-i", ",".join(s.include_disks)]
    if s.exclude_disks:
        argv += ["-x", ",".join(s.exclude_disks)]
    if s.raw:
        argv.append("--raw")
    if s.freeze:
        argv += ["-F", ",".join(s.freeze)]
    if config.scratchdir:
        argv += ["--scratchdir", config.scratchdir]
    if host.user:
        argv += ["--user", host.user]
    if host.is_remote:
        r = host.remote
        for option, value in (
            ("--ssh-user", r.ssh_user),
            ("--ssh-port", r.ssh_port),
            ("--ssh-private-key", r.ssh_key),
            ("-I", r.nbd_ip),
        ):
            if value is not None:
                argv += [option, str(value)]
        if port is not None:
            argv += ["-P", str(port)]
        if r.tls:
            argv += ["--tls", "--tls-cert", r.tls_cert]
    return argv + list(s.args)


def child_env(host: HypervisorConfig) -> dict[str, str]:
    """The environment of a job's processes: this one's, with the hypervisor's password."""
    env = dict(os.environ)
    env.pop(PASSWORD_ENV, None)
    if host.password is not None:
        env[PASSWORD_ENV] = host.password
    return env


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the fleet process dies (even by SIGKILL),
    so that no backup goes on without its lock holder."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(log_path: Path) -> list[str]:
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log_path) - 65536))
            return fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def last_line(log_path: Path) -> str | None:
    lines = [line.strip() for line in _tail(log_path) if line.strip()]
    return lines[-1] if lines else None


def last_message(log_path: Path, level: str) -> str | None:
    """The message of the last ``level`` line (ERROR, WARNING) of a job's log."""
    for line in reversed(_tail(log_path)):
        if f" {level} " in line:
            return line.split("]: ", 1)[-1].strip()
    return None


@dataclass
class Outcome:
    label: str
    state: str
    message: str


@dataclass
class Running:
    job: PlannedJob
    row: int
    proc: subprocess.Popen[bytes]
    lock: FolderLock
    lease: PortLease | None
    started: float
    bytes_before: int
    log_path: Path
    terminated_at: float | None = None
    phase: str = "backup"  # then "prune" when retention rules are set
    outcome: Outcome | None = None  # of the backup, once it ended


class FleetRun:
    def __init__(
        self,
        config: FleetConfig,
        ledger: Ledger,
        run_id: int,
        cancel: threading.Event,
        *,
        clock: Callable[[], float] = time.time,
        port_lock_dir: Path | None = None,
    ) -> None:
        assert config.output is not None
        self.config = config
        self.ledger = ledger
        self.run_id = run_id
        self.cancel = cancel
        self.clock = clock
        self.log_dir = config.output / LOG_DIR_NAME / str(run_id)
        self.pools: dict[str, PortPool] = {}
        for host in config.hypervisors:
            if host.is_remote and not host.remote.over_ssh:  # TCP ports to share out
                extra = {"lock_dir": port_lock_dir} if port_lock_dir else {}
                self.pools[host.name] = PortPool(
                    host.name, host.remote.nbd_port, host.nbd_ports, **extra
                )
        self.outcomes: list[Outcome] = []

    def record_host_failures(self, failures: Iterable[HostFailure]) -> None:
        for failure in failures:
            now = self.clock()
            self.ledger.start_job(
                self.run_id,
                now,
                hypervisor=failure.host.name,
                uri=failure.host.uri,
                vm="",
                state="failed",
                ended=now,
                exit_code=1,
                message=failure.message,
            )
            log.error("hypervisor %s: %s", failure.host.name, failure.message)
            self.outcomes.append(Outcome(failure.host.name, "failed", failure.message))

    def record_vm_failures(self, failures: Iterable[VmFailure]) -> None:
        """Selected VMs that cannot be backed up at all (e.g. their name)."""
        for failure in failures:
            now = self.clock()
            self.ledger.start_job(
                self.run_id,
                now,
                hypervisor=failure.host.name,
                uri=failure.host.uri,
                vm=failure.vm.name,
                uuid=failure.vm.uuid,
                tags=failure.vm.tags,
                state="failed",
                ended=now,
                message=failure.message,
            )
            label = f"{failure.host.name}/{failure.vm.name}"
            log.error("%s: %s", label, failure.message)
            self.outcomes.append(Outcome(label, "failed", failure.message))

    def run(self, jobs: list[PlannedJob]) -> list[Outcome]:
        make_private_dir(self.log_dir)
        pending = list(jobs)
        running: list[Running] = []
        per_host: Counter[str] = Counter()
        stopping = False
        while pending or running:
            if self.cancel.is_set() and not stopping:
                stopping = True
                for job in running:
                    self._terminate(job)
                for planned in pending:
                    self._record_unstarted(planned, "cancelled", "not started: the run was stopped")
                pending.clear()
            if not stopping:
                self._start_ready(pending, running, per_host)
            for job in list(running):
                if job.proc.poll() is None:
                    if (
                        job.terminated_at is not None
                        and self.clock() - job.terminated_at > STOP_GRACE_SECONDS
                    ):
                        log.error(
                            "%s: no end %d s after SIGTERM: killed",
                            job.job.label,
                            STOP_GRACE_SECONDS,
                        )
                        job.proc.kill()
                    continue
                running.remove(job)
                if self._finish(job):
                    running.append(job)  # its retention runs now, in the same slot
                else:
                    per_host[job.job.host.name] -= 1
            if pending or running:
                time.sleep(POLL_SECONDS)
        return self.outcomes

    def _start_ready(
        self, pending: list[PlannedJob], running: list[Running], per_host: Counter[str]
    ) -> None:
        for planned in list(pending):
            if len(running) >= self.config.jobs:
                return
            host = planned.host
            if per_host[host.name] >= self.config.host_limit(host):
                continue
            lease = None
            pool = self.pools.get(host.name)
            if pool is not None:
                try:
                    lease = pool.lease(planned.ports_needed, planned.label)
                except VirtnbdError as err:
                    pending.remove(planned)
                    self._record_unstarted(planned, "failed", str(err))
                    continue
                if lease is None:
                    continue  # every port is in use: wait for a job to end
            pending.remove(planned)
            try:
                started = self._start(planned, lease)
            except (VirtnbdError, OSError) as err:
                if lease is not None:
                    lease.release()
                self._record_unstarted(planned, "failed", str(err))
                continue
            running.append(started)
            per_host[host.name] += 1

    def _row_values(self, job: PlannedJob) -> dict[str, object]:
        return {
            "hypervisor": job.host.name,
            "uri": job.host.uri,
            "vm": job.vm.name,
            "uuid": job.vm.uuid,
            "tags": job.vm.tags,
            "folder": str(job.folder),
            "period": job.period,
            "level": job.level,
        }

    def _record_unstarted(self, job: PlannedJob, state: str, message: str) -> None:
        now = self.clock()
        self.ledger.start_job(
            self.run_id, now, **self._row_values(job), state=state, ended=now, message=message
        )
        (log.warning if state == "cancelled" else log.error)("%s: %s", job.label, message)
        self.outcomes.append(Outcome(job.label, state, message))

    def _start(self, job: PlannedJob, lease: PortLease | None) -> Running:
        lock = lock_vm_folder(job.vm_folder, f"virtnbdfleet run {self.run_id}")
        try:
            make_private_dir(job.folder)
            # Decided again under the lock: another run may have filled the folder.
            job.folder, job.period, job.level = self._refreshed(job)
            port = lease.first if lease else None
            argv = backup_command(job, self.config, port)
            log_path = self.log_dir / f"{job.host.name}.{job.vm.name}.log"
            before = folder_bytes(job.folder)
            started = self.clock()
            row = self.ledger.start_job(
                self.run_id,
                started,
                **self._row_values(job),
                log=str(log_path),
                nbd_port=port,
            )
            log_fd = open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            with os.fdopen(log_fd, "ab") as out:
                out.write(f"# {' '.join(argv[1:])}\n".encode())
                out.flush()
                proc = subprocess.Popen(
                    argv,
                    env=child_env(job.host),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,  # Ctrl-C reaches the fleet, which stops each job
                    preexec_fn=_die_with_parent,
                )
        except BaseException:
            lock.release()
            raise
        log.info(
            "%s: %s backup into %s%s",
            job.label,
            job.level,
            job.folder,
            f" (NBD port {port})" if port else "",
        )
        return Running(job, row, proc, lock, lease, started, before, log_path)

    def _refreshed(self, job: PlannedJob) -> tuple[Path, str, str]:
        if job.settings.level in ("full", "copy"):
            return job.folder, job.period, job.level
        if backup_set_files(job.folder):
            return job.folder, job.period, "inc" if job.settings.level == "auto" else "diff"
        return job.folder, job.period, "full"

    def _terminate(self, job: Running) -> None:
        if job.proc.poll() is None:
            job.proc.send_signal(signal.SIGTERM)
            job.terminated_at = self.clock()
            log.warning("%s: stopping its backup", job.job.label)

    def _finish(self, job: Running) -> bool:
        """Record the end of a job's process; True when its next phase started."""
        if job.phase == "prune":
            self._finish_prune(job)
            return False
        ended = self.clock()
        code = job.proc.returncode
        duration = max(ended - job.started, 1e-6)
        after = folder_bytes(job.job.folder)
        written = max(0, after - job.bytes_before)
        error = last_message(job.log_path, "ERROR")
        if code == 0:
            state, message = "ok", "backup finished"
        elif job.terminated_at is not None:
            state = "interrupted"
            message = f"stopped by SIGINT/SIGTERM of the run: {error or f'exit {code}'}"
        elif code == 2 and error is not None and error.endswith("--strict given"):
            state = "warning"
            message = last_message(job.log_path, "WARNING") or error
        else:
            state = "failed"
            message = error or last_line(job.log_path) or f"virtnbdbackup exited {code}"
        self.ledger.update_job(
            job.row,
            state=state,
            ended=ended,
            duration=duration,
            bytes=written,
            set_bytes=after,
            throughput=written / duration,
            exit_code=code,
            message=message,
        )
        if job.lease is not None:
            job.lease.release()
            job.lease = None
        if state in ("ok", "warning"):
            log.info(
                "%s: %s, %s in %.1f s (%.1f MiB/s)%s",
                job.job.label,
                state,
                human_bytes(written),
                duration,
                written / duration / 2**20,
                "" if state == "ok" else f": {message}",
            )
        elif state == "interrupted":
            log.warning("%s: %s", job.job.label, message)
        else:
            log.error(
                "%s: failed (exit %s): %s; log: %s", job.job.label, code, message, job.log_path
            )
        job.outcome = Outcome(job.job.label, state, message)
        retention = self.config.retention
        if state in ("ok", "warning") and retention is not None and not self.cancel.is_set():
            try:
                self._start_prune(job, retention)
                return True
            except OSError as err:
                self._record_prune(job, "failed", f"cannot start virtnbdprune: {err}")
        job.lock.release()
        self.outcomes.append(job.outcome)
        return False

    def _start_prune(self, job: Running, retention: Retention) -> None:
        """virtnbdprune on ROOT/HOST/VM, the VM folder still locked by this run."""
        host = job.job.host
        argv = [sys.executable, *PRUNE_COMMAND, "-i", str(job.job.vm_folder)]
        argv += [*retention.prune_args(), "-U", host.uri, "-n", "--strict"]
        if host.user:
            argv += ["--user", host.user]
        log_fd = open_private(job.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        with os.fdopen(log_fd, "ab") as out:
            out.write(f"# {' '.join(argv[1:])}\n".encode())
            out.flush()
            job.proc = subprocess.Popen(
                argv,
                env=child_env(host),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # safe: the scheduler is one thread
            )
        job.phase = "prune"
        log.info("%s: retention: %s", job.job.label, " ".join(retention.prune_args()))

    def _finish_prune(self, job: Running) -> None:
        code = job.proc.returncode
        error = last_message(job.log_path, "ERROR")
        if code == 0:
            state, message = "ok", "pruned"
        elif job.terminated_at is not None:
            state, message = "interrupted", f"stopped by SIGINT/SIGTERM: {error or code}"
        elif code == 2 and error is not None and error.endswith("--strict given"):
            state = "warning"
            message = last_message(job.log_path, "WARNING") or error
        else:
            state = "failed"
            message = error or last_line(job.log_path) or f"virtnbdprune exited {code}"
        self._record_prune(job, state, message)
        job.lock.release()
        assert job.outcome is not None
        self.outcomes.append(job.outcome)
        if state in ("failed", "interrupted"):
            # The backup is good; the run still failed to apply the rules.
            self.outcomes.append(Outcome(job.job.label, state, f"retention: {message}"))
        elif state == "warning":
            self.outcomes.append(Outcome(job.job.label, "warning", f"retention: {message}"))

    def _record_prune(self, job: Running, state: str, message: str) -> None:
        self.ledger.update_job(job.row, prune_state=state, prune_message=message)
        if state == "ok":
            log.info("%s: retention applied", job.job.label)
        else:
            (log.warning if state == "warning" else log.error)(
                "%s: retention %s: %s; log: %s", job.job.label, state, message, job.log_path
            )


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def peak_rss_kib() -> int:
    """The fleet process's own peak RSS (its children not included)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
