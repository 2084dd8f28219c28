"""Running an external tool, its failure turned into an actionable error."""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
from collections.abc import Callable

from ..errors import VirtnbdError

log = logging.getLogger(__name__)


def run_tool(
    argv: list[str],
    what: str,
    error: type[VirtnbdError],
    package: str,
    on_failure: Callable[[int, str], None] | None = None,
) -> str:
    """Run ``argv``; its standard output, or ``error`` naming what failed and why.

    ``package`` is what to install when the tool is missing. ``on_failure``
    sees the exit status and the reason first, and may raise its own error.
    """
    log.debug("running %s", shlex.join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise error(f"{argv[0]} is not installed (install {package})") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        reason = detail[-1] if detail else f"exit {proc.returncode}"
        if on_failure is not None:
            on_failure(proc.returncode, reason)
        raise error(f"cannot {what}: {reason}")
    return proc.stdout


def end_child(proc: subprocess.Popen[bytes]) -> None:
    """End a child that stops when its standard input closes (an SSH session, a
    qemu-nbd wrapper): close it, wait, kill it if it does not go within 30 s."""
    if proc.stdin:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()
