"""The guest agent adapter against recorded agent replies, and -F parsing."""

from __future__ import annotations

import json
import threading

import pytest

from libvirtnbdbackup.adapters.guestagent import GuestAgent, Pending, bounded
from libvirtnbdbackup.cli.backup import build_parser, options_from
from libvirtnbdbackup.errors import AgentError


class Recorded:
    """Answers each agent request with the next recorded reply, keeping
    the requests for the test to check."""

    def __init__(self, replies: list[dict[str, object]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, object]] = []

    def __call__(self, request: str, timeout: int) -> str:
        self.requests.append(json.loads(request))
        return json.dumps(self.replies.pop(0))


def agent(replies: list[dict[str, object]]) -> tuple[GuestAgent, Recorded]:
    transport = Recorded(replies)
    return GuestAgent(None, transport), transport  # type: ignore[arg-type]


def test_command_sends_arguments_and_returns_the_return_value() -> None:
    ga, sent = agent([{"return": {"id": "debian", "kernel-release": "6.1.0-57-amd64"}}])
    assert ga.command("guest-get-osinfo")["id"] == "debian"
    assert sent.requests == [{"execute": "guest-get-osinfo"}]


def test_an_agent_error_reply_is_an_agent_error() -> None:
    ga, _ = agent([{"error": {"class": "GenericError", "desc": "Command not found"}}])
    with pytest.raises(AgentError, match="guest-get-osinfo: Command not found"):
        ga.command("guest-get-osinfo")


def test_run_polls_until_the_program_exits_and_decodes_its_output() -> None:
    ga, sent = agent(
        [
            {"return": {"pid": 612}},
            {"return": {"exited": False}},
            {"return": {"exited": True, "exitcode": 0, "out-data": "aGVsbG8K"}},
        ]
    )
    result = ga.run("/bin/echo", ["hello"])
    assert (result.exitcode, result.stdout, result.stderr) == (0, "hello\n", "")
    assert sent.requests[0] == {
        "execute": "guest-exec",
        "arguments": {"path": "/bin/echo", "arg": ["hello"], "capture-output": True},
    }
    assert sent.requests[1:] == [{"execute": "guest-exec-status", "arguments": {"pid": 612}}] * 2


def test_bounded_gives_up_on_a_call_that_does_not_return_and_can_wait_for_it() -> None:
    release = threading.Event()
    with pytest.raises(AgentError, match=r"did not answer the freeze within 0\.05 s") as caught:
        bounded(lambda: release.wait(60), 0.05, "the freeze")
    pending = caught.value.pending
    assert isinstance(pending, Pending)
    release.set()
    assert pending.wait(60)


def test_freeze_mountpoint_option() -> None:
    parse = build_parser().parse_args
    assert options_from(parse(["-d", "vm", "-o", "out"])).freeze_mountpoints is None
    args = parse(["-d", "vm", "-o", "out", "-F", "/var/lib/mysql, /data"])
    assert options_from(args).freeze_mountpoints == ["/var/lib/mysql", "/data"]
    long = parse(["-d", "vm", "-o", "out", "--freeze-mountpoint", "/srv"])
    assert options_from(long).freeze_mountpoints == ["/srv"]
