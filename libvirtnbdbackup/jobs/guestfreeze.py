"""The freeze step: guest filesystems frozen while the checkpoint and the
backup job are created, thawed right after, on every path out.

Without an agent, or with one that does not answer in time, the backup goes
on crash-consistent after one warning (exit code 2 with ``--strict``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..adapters.guestagent import FREEZE_TIMEOUT, GuestAgent, Pending
from ..adapters.virt import Domain
from ..errors import AgentError

log = logging.getLogger(__name__)


@dataclass
class FreezeOutcome:
    frozen: int = 0  # filesystems frozen
    agent_answered: bool = False  # whether later agent calls are worth making


@contextmanager
def frozen_filesystems(
    domain: Domain, mountpoints: list[str] | None, timeout: float = FREEZE_TIMEOUT
) -> Iterator[FreezeOutcome]:
    outcome = FreezeOutcome()
    if domain.is_paused():
        log.info("domain %s is paused: no filesystem freeze", domain.name)
        yield outcome
        return
    agent = domain.agent()
    pending: Pending | None = None
    try:
        outcome.frozen = agent.freeze(mountpoints, timeout)
        outcome.agent_answered = True
        log.info(
            "froze %d guest filesystem(s)%s",
            outcome.frozen,
            f" ({', '.join(mountpoints)})" if mountpoints else "",
        )
    except AgentError as err:
        pending = err.pending if isinstance(err.pending, Pending) else None
        log.warning(
            "domain %s: guest filesystems not frozen (%s): the backup is crash-consistent",
            domain.name,
            err,
        )
    except BaseException:
        # Stopped while the freeze ran: it may still land. libvirt runs one
        # agent call at a time per domain, so this thaw comes after it.
        _thaw(domain, agent, None, timeout)
        raise
    try:
        yield outcome
    finally:
        if outcome.frozen or pending is not None:
            _thaw(domain, agent, pending, timeout)


def _thaw(domain: Domain, agent: GuestAgent, pending: Pending | None, timeout: float) -> None:
    """Thaw; a freeze given up on is waited for first, as it may still land."""
    if pending is not None and not pending.wait(timeout):
        log.error(
            "domain %s: the filesystem freeze still has no answer; if the guest's filesystems "
            "end up frozen, thaw them with: virsh domfsthaw %s",
            domain.name,
            domain.name,
        )
        return
    try:
        thawed = agent.thaw(timeout)
        log.info("thawed %d guest filesystem(s)", thawed)
    except AgentError as err:
        log.error(
            "domain %s: cannot thaw the guest's filesystems (%s); thaw them with: "
            "virsh domfsthaw %s",
            domain.name,
            err,
            domain.name,
        )
