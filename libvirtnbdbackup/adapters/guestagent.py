"""qemu-guest-agent, reached through libvirt: filesystem freeze and thaw,
guest information, and commands run in the guest.

Every call is bounded in time: libvirt gives an agent that is configured
but not running 5 s to answer its sync, and calls that libvirt itself would
wait on forever (a freeze that hangs in the guest) run on a helper thread
that is given up on after ``timeout`` seconds.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from ..errors import AgentError

# Seconds an agent command may take, and a freeze or thaw (which walks every
# filesystem of the guest and syncs it first).
COMMAND_TIMEOUT = 10
FREEZE_TIMEOUT = 30

# Sends one JSON command to the agent, returns its JSON reply.
Transport = Callable[[str, int], str]

T = TypeVar("T")


def _message(err: libvirt.libvirtError) -> str:
    return err.get_error_message() or str(err)


@dataclass(frozen=True)
class ExecResult:
    exitcode: int
    stdout: str
    stderr: str


class Pending:
    """A call still running on its helper thread after its time ran out."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()`` on a helper thread; AgentError when it fails or takes longer
    than ``timeout`` (the thread then goes on: ``err.pending`` waits for it)."""
    result: list[T] = []
    error: list[BaseException] = []

    def call() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=call, name="agent", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        err = AgentError(f"the guest agent did not answer {what} within {timeout:g} s")
        err.pending = Pending(thread)
        raise err
    if error:
        if isinstance(error[0], AgentError):
            raise error[0]
        if isinstance(error[0], libvirt.libvirtError):
            raise AgentError(f"{what}: {_message(error[0])}") from None
        raise error[0]
    return result[0]


class GuestAgent:
    """The agent of one running domain."""

    def __init__(self, dom: libvirt.virDomain, transport: Transport | None = None) -> None:
        self._dom = dom
        self._transport = transport or self._libvirt_transport

    def _libvirt_transport(self, request: str, timeout: int) -> str:
        return str(libvirt_qemu.qemuAgentCommand(self._dom, request, timeout, 0))

    def command(self, execute: str, timeout: int = COMMAND_TIMEOUT, **arguments: Any) -> Any:
        """One agent command; its ``return`` value."""
        request: dict[str, Any] = {"execute": execute}
        if arguments:
            request["arguments"] = arguments
        try:
            reply = json.loads(self._transport(json.dumps(request), timeout))
        except libvirt.libvirtError as err:
            raise AgentError(f"guest agent command {execute}: {_message(err)}") from None
        except ValueError as err:
            raise AgentError(f"guest agent command {execute}: reply is not JSON ({err})") from None
        if "error" in reply:
            desc = reply["error"].get("desc", reply["error"])
            raise AgentError(f"guest agent command {execute}: {desc}")
        return reply.get("return")

    def freeze(self, mountpoints: list[str] | None, timeout: float = FREEZE_TIMEOUT) -> int:
        """Freeze the guest's filesystems (only ``mountpoints`` if given);
        the number frozen. libvirt keeps track of the frozen state."""
        return bounded(
            lambda: int(self._dom.fsFreeze(mountpoints or None, 0)),
            timeout,
            "the filesystem freeze",
        )

    def thaw(self, timeout: float = FREEZE_TIMEOUT) -> int:
        return bounded(lambda: int(self._dom.fsThaw(None, 0)), timeout, "the filesystem thaw")

    def os_info(self) -> dict[str, Any]:
        """guest-get-osinfo: id, name, version, kernel release and so on."""
        info = bounded(lambda: self.command("guest-get-osinfo"), COMMAND_TIMEOUT + 5, "osinfo")
        if not isinstance(info, dict):
            raise AgentError(f"guest-get-osinfo returned {info!r}, not an object")
        return info

    def filesystems(self) -> list[dict[str, Any]]:
        found = bounded(lambda: self.command("guest-get-fsinfo"), COMMAND_TIMEOUT + 5, "fsinfo")
        return list(found or [])

    def run(self, path: str, args: list[str], timeout: float = 60) -> ExecResult:
        """Run a program in the guest and wait for it (at most ``timeout`` s)."""
        started = self.command("guest-exec", path=path, arg=args, **{"capture-output": True})
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.command("guest-exec-status", pid=pid)
            if status.get("exited"):
                return ExecResult(
                    int(status.get("exitcode", -1)),
                    _decode(status.get("out-data")),
                    _decode(status.get("err-data")),
                )
            if time.monotonic() > deadline:
                raise AgentError(f"{path} in the guest still runs after {timeout:g} s")
            time.sleep(0.2)


def _decode(data: str | None) -> str:
    return base64.b64decode(data).decode("utf-8", "replace") if data else ""
