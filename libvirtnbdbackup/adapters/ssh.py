"""A hypervisor host reached with the OpenSSH client.

Commands run through ``ssh`` in batch mode (keys or an agent, never a
password prompt), so the user's ``~/.ssh/config`` and ``known_hosts``
apply as for any other ssh command. Files travel over the same channel.

Short commands share one connection (an OpenSSH control master, closed by
:meth:`SshHost.close`) instead of paying a handshake each; long-running
ones (servers) get their own, as sshd limits the sessions per connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from ..errors import SshError
from ..targets.private import PRIVATE_DIR
from .command import end_child

log = logging.getLogger(__name__)

SSH_FAILED = 255  # ssh's own exit code: the connection, not the command, failed
CONTROL_PERSIST = 60  # seconds a shared connection outlives its last use
FORWARD_CHECK_SECONDS = 30  # for the first byte through a new forward

# Run remotely as ``sh -c SCRIPT sh ARG...``: the paths are never re-parsed.
_UPLOAD = (
    'umask "${2:-077}" && cat > "$1.partial" && sync -- "$1.partial" && mv -- "$1.partial" "$1"'
)
_COMMIT = 'sync -- "$1" && mv -- "$1" "$2" && sync -- "$(dirname -- "$2")"'


@dataclass(frozen=True)
class SshHost:
    host: str
    user: str | None = None
    port: int | None = None
    key: str | None = None  # private key file
    control_path: str | None = None  # socket of the shared connection

    @property
    def name(self) -> str:
        return self.host

    @property
    def is_remote(self) -> bool:
        return True

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh_argv(
        self, *, dedicated: bool = False, control: str | None = None, extra: tuple[str, ...] = ()
    ) -> list[str]:
        """ssh and its options up to the host; ``control`` is a -O command
        for the shared connection, ``extra`` more options (-L)."""
        argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", *extra]
        if control:
            argv += ["-O", control]
        if self.control_path and not dedicated:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}"]
            argv += ["-o", f"ControlPersist={CONTROL_PERSIST}"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.key:
            argv += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        if self.user:
            argv += ["-l", self.user]
        return [*argv, "--", self.host]

    def command(self, argv: list[str], *, dedicated: bool = False) -> list[str]:
        return [*self.ssh_argv(dedicated=dedicated), shlex.join(argv)]

    def close(self) -> None:
        """End the shared connection, if one was opened."""
        if not self.control_path:
            return
        if os.path.exists(self.control_path):
            subprocess.run(
                self.ssh_argv(control="exit"), capture_output=True, check=False, timeout=30
            )
        shutil.rmtree(os.path.dirname(self.control_path), ignore_errors=True)

    @contextmanager
    def forward(self, remote_socket: str) -> Iterator[str]:
        """A local unix socket forwarded to ``remote_socket`` on the host,
        over the shared connection (or, without one, a connection of its
        own); yields its path. The socket is in a fresh 0700 folder and
        ssh creates it 0600 (StreamLocalBindMask): it is ours alone."""
        folder = tempfile.mkdtemp(prefix="virtnbdbackup-fwd.")
        local = os.path.join(folder, "nbd.sock")
        spec = ("-L", f"{local}:{remote_socket}")
        proc = None
        try:
            if self.control_path and os.path.exists(self.control_path):
                self._mux("forward", spec)
            else:
                proc = self._forwarding_session(spec)
            self._check_forward(local, remote_socket)
            yield local
        finally:
            if proc is not None:
                end_child(proc)
            else:
                with contextlib.suppress(SshError):
                    self._mux("cancel", spec)
            shutil.rmtree(folder, ignore_errors=True)

    def _check_forward(self, local: str, remote_socket: str) -> None:
        """ssh accepts on the local end first and asks sshd for the remote one
        only then: a server that speaks first (NBD does) must be heard."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(FORWARD_CHECK_SECONDS)
        try:
            probe.connect(local)
            heard = probe.recv(1, socket.MSG_PEEK)
        except OSError:
            heard = b""
        finally:
            probe.close()
        if not heard:
            raise SshError(
                f"{self.host}: the SSH server did not forward {remote_socket} (is "
                "AllowStreamLocalForwarding or DisableForwarding set in its sshd_config?); "
                "allow it for this login, or give -P PORT for NBD over TCP as 2.47 did"
            )

    def _mux(self, command: str, spec: tuple[str, ...]) -> None:
        cmd = self.ssh_argv(control=command, extra=("-o", "ExitOnForwardFailure=yes", *spec))
        log.debug("running %s", shlex.join(cmd))
        proc = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
        if proc.returncode != 0:
            reason = proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
            raise SshError(f"{self.host}: cannot forward {spec[1]} over SSH: {reason}")

    def _forwarding_session(self, spec: tuple[str, ...]) -> subprocess.Popen[bytes]:
        """A connection that forwards until our end of its stdin closes (we
        are done, or gone)."""
        argv = self.ssh_argv(dedicated=True, extra=("-o", "ExitOnForwardFailure=yes", *spec))
        cmd = [*argv, "echo ready; read -r _"]
        log.debug("running %s", shlex.join(cmd))
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.wait()
            detail = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise SshError(unreachable(self.login, detail[-1] if detail else "no answer"))
        return proc

    def check(self) -> None:
        """Fail early, with the reason, when the host cannot be reached."""
        self._run(["true"], "run a command")

    def exists(self, path: str) -> bool:
        proc = self._run(["test", "-e", path], f"look for {path}", ok=(0, 1))
        return proc.returncode == 0

    def remove(self, path: str) -> None:
        self._run(["rm", "-f", "--", path], f"remove {path}")

    def makedirs(self, path: str, mode: int = PRIVATE_DIR) -> None:
        # -m sets the mode of the last folder only, and only if it is made now.
        script = '[ -d "$1" ] || { mkdir -p -- "$(dirname -- "$1")" && mkdir -m "$2" -- "$1"; }'
        self._run(["sh", "-c", script, "sh", path, f"{mode:o}"], f"create folder {path}")

    def restrict(self, path: str) -> None:
        self._run(["chmod", "go=", "--", path], f"restrict access to {path}")

    def make_scratch_dir(self, parent: str, owner: str | None) -> str:
        script = (
            'd=$(mktemp -d "$1/$2XXXXXXXXXX") && { [ -z "$3" ] || chown "$3" "$d"; } && echo "$d"'
        )
        proc = self._run(
            ["sh", "-c", script, "sh", parent, "virtnbdbackup.", owner or ""],
            f"create a scratch folder in {parent}",
        )
        return proc.stdout.decode().strip()

    def remove_tree(self, path: str) -> None:
        self._run(["rm", "-rf", "--", path], f"remove {path}")

    def commit(self, partial: str, final: str) -> None:
        self._run(["sh", "-c", _COMMIT, "sh", partial, final], f"complete {final}")

    def fetch(self, path: str, dest: str) -> None:
        with open(dest, "wb") as out:
            self._run(["cat", "--", path], f"copy {path}", stdout=out)

    def put(self, source: str, path: str, *, readable: bool = False) -> None:
        umask = "022" if readable else "077"
        with open(source, "rb") as src:
            self._run(["sh", "-c", _UPLOAD, "sh", path, umask], f"write {path}", stdin=src)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._run(["sh", "-c", _UPLOAD, "sh", path], f"write {path}", data=data)

    def _run(
        self,
        argv: list[str],
        what: str,
        *,
        ok: tuple[int, ...] = (0,),
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        data: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = self.command(argv)
        log.debug("running %s", shlex.join(cmd))
        try:
            proc = subprocess.run(
                cmd,
                input=data,
                stdin=stdin if data is None else None,
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        except FileNotFoundError:
            raise SshError("ssh is not installed (install openssh-client)") from None
        if proc.returncode in ok:
            return proc
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = detail[-1] if detail else f"exit {proc.returncode}"
        if proc.returncode == SSH_FAILED:
            raise SshError(unreachable(self.login, reason))
        raise SshError(f"{self.host}: cannot {what}: {reason}")


def unreachable(login: str, reason: str) -> str:
    return (
        f"cannot reach {login} over SSH: {reason} (log in once with ssh to accept the host "
        "key; check --ssh-user, --ssh-port and --ssh-private-key)"
    )
