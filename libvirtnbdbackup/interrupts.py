"""Stopping on SIGINT and SIGTERM, at any moment, with one line.

The handlers are installed before anything else is imported (see
``cli/launch.py``). The first signal sets the process's :class:`Cancel`
event, which worker threads poll, and raises :class:`Stopped` in the main
thread, so that whatever it is blocked in unwinds through the ``finally``
blocks that clean up (a backup job stopped, a checkpoint taken back,
``.partial`` files removed). Code that must not be cut short (that
cleanup itself, the start of a backup job, a wait whose normal end is a
signal) calls ``Cancel.defer()`` inside a ``Cancel.scope()``: a signal
there only sets the event, and ``Cancel.check()`` raises it afterwards. A
second signal exits at once, without cleaning up.

This module imports nothing of the package, so that installing it costs
nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_INTERRUPTED = 1  # as any error (README "Exit codes")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A signal asked us to stop. A BaseException, as KeyboardInterrupt is:
    no ``except Exception`` on the way may swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signame = signal.Signals(signum).name

    def __str__(self) -> str:
        return f"caught {self.signame}: stopped"


class Cancel(threading.Event):
    """Set by the first signal; workers poll it, jobs hand it down."""

    def __init__(self) -> None:
        super().__init__()
        # The signal handler sets the event in the main thread, between any two
        # bytecodes: also while the main thread is inside wait() and holds the
        # event's lock. With threading.Event's plain Lock, set() then waited for
        # itself forever (virtnbdmap hung in about one Ctrl-C in three, its loop
        # device left attached); a reentrant lock lets the handler through.
        self._cond = threading.Condition(threading.RLock())
        self._deferred = 0
        self.signum: int | None = None  # the signal that set it

    @property
    def raising(self) -> bool:
        return self._deferred == 0

    def check(self) -> None:
        """Raise Stopped if a signal came (e.g. during a deferred block)."""
        if self.signum is not None:
            raise Stopped(self.signum)

    def defer(self) -> None:
        """From here to the end of the enclosing ``scope()``, signals only
        set the event (for a wait, and the cleanup after it)."""
        self._deferred += 1

    @contextmanager
    def scope(self) -> Iterator[None]:
        saved = self._deferred
        try:
            yield
        finally:
            self._deferred = saved


_state: dict[str, object] = {}


def install(prog: str) -> Cancel:
    """Install the handlers (once per process); the process's Cancel."""
    cancel = _state.get("cancel")
    if isinstance(cancel, Cancel):
        return cancel
    cancel = Cancel()
    _state.update(cancel=cancel, prog=prog, count=0)

    def handler(signum: int, _frame: FrameType | None) -> None:
        count = int(str(_state["count"])) + 1
        _state["count"] = count
        if count > 1:
            name = signal.Signals(signum).name
            os.write(
                2,
                f"{prog}: caught {name} again: exiting at once, without cleaning up\n".encode(),
            )
            os._exit(EXIT_INTERRUPTED)
        cancel.signum = signum
        cancel.set()
        logging.getLogger(prog).info(
            "caught %s: cleaning up (a second one exits at once, without cleaning up)",
            signal.Signals(signum).name,
        )
        if cancel.raising and threading.current_thread() is threading.main_thread():
            raise Stopped(signum)

    for signum in SIGNALS:
        signal.signal(signum, handler)
    return cancel


def stopped_line(prog: str, err: Stopped) -> int:
    """For a Stopped caught before logging is set up: one line, the exit code."""
    sys.stderr.write(f"{prog}: {err}\n")
    return EXIT_INTERRUPTED
