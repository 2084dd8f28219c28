"""The console scripts: signal handlers first, then the command.

Importing a command pulls in libvirt, libnbd and the whole package, which
takes a noticeable fraction of a second; a Ctrl-C in that time must stop
the command with one line like at any later moment, not with a
KeyboardInterrupt traceback.
"""

from __future__ import annotations

import importlib
import sys

from ..interrupts import Stopped, install, stopped_line

# console script -> the module with its build_parser() and main()
COMMANDS = {
    "virtnbdbackup": "libvirtnbdbackup.cli.backup",
    "virtnbdrestore": "libvirtnbdbackup.cli.restore",
    "virtnbdmap": "libvirtnbdbackup.cli.map",
    "virtnbdprune": "libvirtnbdbackup.cli.prune",
    "virtnbdfleet": "libvirtnbdbackup.cli.fleet",
}


def _launch(prog: str) -> int:
    install(prog)
    try:
        main = importlib.import_module(COMMANDS[prog]).main
        return int(main())
    except Stopped as err:
        return stopped_line(prog, err)


def virtnbdbackup() -> int:
    return _launch("virtnbdbackup")


def virtnbdrestore() -> int:
    return _launch("virtnbdrestore")


def virtnbdmap() -> int:
    return _launch("virtnbdmap")


def virtnbdprune() -> int:
    return _launch("virtnbdprune")


def virtnbdfleet() -> int:
    return _launch("virtnbdfleet")


if __name__ == "__main__":
    sys.exit(_launch(sys.argv.pop(1)))
