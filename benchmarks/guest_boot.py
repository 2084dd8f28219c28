"""How long the Linux test guest takes to build and to boot, on this host.

Builds the guest into a fresh cache folder with scripts/build-test-guest.sh
(timing the build from nothing, then the cached call), boots it as the test
fixture does (direct kernel boot, TCG) and times the start until
``guest-ping`` answers and until the data disks are mounted. Under TCG the
boot time follows the host's load: about 7 s was seen on an idle host of
this kind, 23 to 74 s while parallel test suites shared its two cores.
Run as root:

    VNBT_LAB=bench venv/env/bin/python benchmarks/guest_boot.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration import guestlab
from tests.integration.vmlab import ensure_libvirtd, sh


def timed(fn: object) -> float:
    start = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - start


def main() -> None:
    conn = ensure_libvirtd()
    cache = Path(tempfile.mkdtemp(prefix="guest-cache.", dir="/var/tmp"))
    try:
        script = guestlab.REPO / "scripts" / "build-test-guest.sh"
        build = timed(lambda: sh(script, cache))
        cached = timed(lambda: sh(script, cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"build: {build:.2f} s from nothing, {cached:.2f} s cached")

    guest = guestlab.create_guest(conn)
    try:
        start = time.monotonic()
        guest.dom.create()
        while True:
            try:
                guest.ping()
                break
            except guestlab.AgentError:
                time.sleep(0.2)
        ping = time.monotonic() - start
        ready = ping + guest.wait_ready()
        print(f"boot: guest-ping after {ping:.1f} s, data disks mounted after {ready:.1f} s")
    finally:
        guestlab.remove_guest(guest)


if __name__ == "__main__":
    main()
