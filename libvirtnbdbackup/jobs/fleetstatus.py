"""What the ledger says about each VM: its last good backup and last failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..targets.fleetledger import FAILED_STATES, JobRow, Ledger
from .fleetselect import Selection


@dataclass(frozen=True)
class VmStatus:
    hypervisor: str
    vm: str  # '' for the hypervisor itself (listing it failed)
    last: JobRow
    last_good: JobRow | None
    last_failure: JobRow | None
    running: bool  # a job of a run that still runs

    @property
    def state(self) -> str:
        """The last job's state; ``lost`` for a job whose run died without ending it."""
        if self.last.state == "running" and not self.running:
            return "lost"
        return self.last.state

    def age(self, now: float) -> float | None:
        if self.last_good is None or self.last_good.ended is None:
            return None
        return max(0.0, now - self.last_good.ended)

    def as_dict(self, now: float) -> dict[str, Any]:
        def brief(row: JobRow | None) -> dict[str, Any] | None:
            if row is None:
                return None
            keys = (
                "run_id",
                "state",
                "started",
                "ended",
                "duration",
                "bytes",
                "set_bytes",
                "throughput",
                "exit_code",
                "message",
                "folder",
                "period",
                "level",
                "log",
            )
            return {k: getattr(row, k) for k in keys}

        return {
            "hypervisor": self.hypervisor,
            "vm": self.vm,
            "tags": list(self.last.tags),
            "state": self.state,
            "age_seconds": self.age(now),
            "last_good": brief(self.last_good),
            "last_failure": brief(self.last_failure),
        }


def fleet_status(
    ledger: Ledger, selection: Selection | None = None, hosts: set[str] | None = None
) -> list[VmStatus]:
    """Per (hypervisor, vm) in the ledger; with ``selection``/``hosts`` only those
    chosen (tag selectors match the tags the domain had at its last backup)."""
    out = []
    alive: dict[int, bool] = {}
    for (host, vm), rows in ledger.jobs_by_vm():
        last = rows[-1]
        if hosts is not None and host not in hosts:
            continue
        chosen = selection is None or selection.is_empty or selection.chooses(vm, last.tags)
        if vm and not chosen:
            continue
        if not vm and rows[-1].state not in FAILED_STATES:
            continue
        good = [r for r in rows if r.good]
        failed = [r for r in rows if r.state in FAILED_STATES]
        running = False
        if last.state == "running":
            if last.run_id not in alive:
                alive[last.run_id] = ledger.run_alive(last.run_id)
            running = alive[last.run_id]
        out.append(
            VmStatus(
                host,
                vm,
                last,
                good[-1] if good else None,
                failed[-1] if failed else None,
                running,
            )
        )
    return out


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
