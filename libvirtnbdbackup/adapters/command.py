"""Running an external tool, its failure turned into an actionable error."""

from __future__ import annotations

import logging
import subprocess

from ..errors import VirtnbdError

log = logging.getLogger(__name__)


def run_tool(cmd: list[str], what: str, error: type[VirtnbdError], package: str) -> str:
    """Run ``cmd``; its standard output, or ``error`` naming what failed and why.

    ``package`` is the Debian package to install when the tool is missing.
    """
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise error(f"{cmd[0]} is not installed (install {package})") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        raise error(f"cannot {what}: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout
