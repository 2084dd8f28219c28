"""A whole backup, restore and map cycle, local and remote, while an
unprivileged user (``nobody``) tries to read every file, folder, socket and
port the tools create: it gets nothing.

Each tool is frozen (SIGSTOP) while its NBD servers are up and its files
half written, so the probe sees them as they are during a run; then it
goes on. Everything is kept under a 0755 folder, so only the modes the
tools set stand between ``nobody`` and the data.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from .remotelab import SshServer, free_ports, make_pki, ssh_server
from .vmlab import BIN, DiskSpec, LabVM, MiB, create_vm, images_identical, remove_vm

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
POLL = 0.005

# Run by the system python as nobody: what of PATHS, SOCKETS and PORTS it got.
PROBE = r"""
import json, os, socket, subprocess, sys
paths, sockets, ports = json.loads(sys.argv[1])
got = []
for path in paths:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.listdir(path)
            got.append("listed " + path)
        else:
            with open(path, "rb") as fh:
                fh.read(1)
            got.append("read " + path)
    except OSError:
        pass
uris = ["nbd+unix:///?socket=" + s for s in sockets] + ["nbd://%s:%d" % (h, p) for h, p in ports]
for uri in uris:
    proc = subprocess.run(["nbdinfo", "--list", uri], capture_output=True, timeout=30)
    if proc.returncode == 0:
        got.append("NBD exports at " + uri)
print(json.dumps(got))
"""


def nobody_gets(paths: list[Path], sockets: list[str], ports: list[tuple[str, int]]) -> list[str]:
    arg = json.dumps([[str(p) for p in paths], sockets, ports])
    proc = subprocess.run(
        [*AS_NOBODY, "/usr/bin/python3", "-c", PROBE, arg],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def tree(*roots: Path) -> list[Path]:
    """Every entry under the roots (as root sees them), the roots included."""
    found: list[Path] = []
    for root in roots:
        if root.exists():
            found += [root, *root.rglob("*")]
    return found


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.add(child)
                todo.append(child)
    return found


def listening(pids: set[int]) -> tuple[list[str], list[tuple[str, int]]]:
    """Unix sockets and TCP ports these processes listen on."""
    sockets, ports = [], []
    out = subprocess.run(["ss", "-lxtnpH"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if not owners & pids:
            continue
        fields = line.split()
        if fields[0] == "u_str" and fields[4].startswith("/"):
            sockets.append(fields[4])
        elif fields[0] == "tcp":
            host, _, port = fields[4].rpartition(":")
            host = host.strip("[]").split("%")[0]
            if host in ("", "*", "0.0.0.0", "::"):  # a wildcard: reached on loopback
                host = "127.0.0.1"
            ports.append((f"[{host}]" if ":" in host else host, int(port)))
    return sockets, ports


def job_running(vm: LabVM) -> bool:
    try:
        return vm.has_job()
    except libvirt.libvirtError:  # "backup job data missing" while a job starts or ends
        return False


def qemu_pid(vm: LabVM) -> int:
    return int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text())


OURS = ("virtnbdbackup", "virtnbdmap")  # prefixes of what the tools create in /var/tmp, /tmp


def new_entries(before: set[str], folder: Path = Path("/var/tmp")) -> list[Path]:
    """What the tools made in ``folder`` since ``before`` (other labs' files aside)."""
    made = [n for n in set(os.listdir(folder)) - before if n.startswith(OURS)]
    # Parallel suites' own probes create 2.47's names as nobody: theirs to read.
    nobody = pwd.getpwnam("nobody").pw_uid
    return tree(*[folder / n for n in made if _owner(folder / n) not in (nobody, None)])


def _owner(path: Path) -> int | None:
    try:
        return path.lstat().st_uid
    except OSError:
        return None


def socket_files(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                found.append(str(path))
    return found


def qemu_nbd_of(folder: Path) -> set[int]:
    """qemu-nbd processes serving an image in ``folder`` (they fork away from us)."""
    found = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                entry.name.isdigit()
                and b"qemu-nbd" in argv[0]
                and str(folder).encode() in b" ".join(argv)
            ):
                found.add(int(entry.name))
    return found


def probe(paths: list[Path], pids: set[int]) -> list[str]:
    """What nobody gets of these paths, and of the sockets and ports of these processes."""
    sockets, ports = listening(pids)
    return nobody_gets(paths, sorted({*sockets, *socket_files(paths)}), ports)


@contextlib.contextmanager
def frozen_while(proc: subprocess.Popen[str], ready: object) -> Iterator[None]:
    """Stop ``proc`` as soon as ``ready()`` holds, until the block ends."""
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()
        time.sleep(POLL)
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def start(tool: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / tool), "-n", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str]) -> str:
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return err


@pytest.fixture()
def open_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="vnbt-sweep.", dir="/var/tmp"))
    root.chmod(0o755)  # nobody may enter: only the tools' own modes protect their files
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture()
def big_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """Enough incompressible data that a -z 9 backup runs a while."""
    lab = create_vm(conn, [DiskSpec("vda", 1024 * MiB, random_mib=256)], cdrom=False)
    yield lab
    remove_vm(lab)


def test_nobody_reads_anything_of_a_backup_restore_and_map_cycle(
    big_vm: LabVM, open_root: Path
) -> None:
    vm, root = big_vm, open_root
    out, restored = root / "backup", vm.folder / "sweep-restore"
    vm.folder.chmod(0o755)
    old_umask = os.umask(0o022)  # the usual umask, under which 2.x made everything readable
    try:
        var_tmp = set(os.listdir("/var/tmp"))
        proc = start("virtnbdbackup", "-d", vm.name, "-l", "full", "-z", "9", "-o", out)
        with frozen_while(proc, lambda: job_running(vm)):
            assert job_running(vm), "the backup was frozen while its job runs"
            found = [*tree(out), *new_entries(var_tmp)]
            assert socket_files(found), "the job's NBD socket is probed"
            got = probe(found, {qemu_pid(vm), proc.pid, *descendants(proc.pid)})
        finish(proc)
        assert got == []
        assert nobody_gets(tree(out), [], []) == []

        proc = start("virtnbdrestore", "-i", out, "-o", restored)
        with frozen_while(proc, lambda: listening(qemu_nbd_of(restored))[0]):
            pids = {*descendants(proc.pid), *qemu_nbd_of(restored)}
            sockets, _ports = listening(pids)
            assert sockets, "the restore's qemu-nbd socket is probed"
            got = probe([*tree(restored), *new_entries(var_tmp)], pids)
        finish(proc)
        assert got == []
        assert nobody_gets(tree(restored), [], []) == []
        vm.dom.suspend()
        assert images_identical(vm.images["vda"], next(restored.glob("*.qcow2")))
        vm.dom.resume()

        pki = root / "pki"
        make_pki(pki)
        os.chmod(pki, 0o700)
        port = free_ports()
        for args in (
            ["--listen", f"unix:{root}/map.sock"],
            ["--listen", f"0.0.0.0:{port}", "--tls", "--tls-cert", str(pki)],
            [],  # a loop device over nbdfuse
        ):
            proc = start("virtnbdmap", "-i", out, *args)
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("ready:"):
                    break
            devices = [Path(x.split(": ", 1)[1].strip()) for x in lines if x.startswith("device")]
            pids = {proc.pid, *descendants(proc.pid)}
            assert any(listening(pids)), lines
            got = probe([*devices, *tree(root / "map.sock"), *new_entries(var_tmp)], pids)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, proc.stderr.read()  # type: ignore[union-attr]
            assert got == [], args
    finally:
        os.umask(old_umask)


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with ssh_server() as server:
        yield server


def test_nobody_reads_anything_of_a_remote_backup_and_restore(
    big_vm: LabVM, sshd: SshServer, open_root: Path
) -> None:
    """The default remote transport opens no port anyone could read the disk from."""
    vm, root = big_vm, open_root
    out, restored = root / "backup", vm.folder / "sweep-remote"
    var_tmp, tmp = set(os.listdir("/var/tmp")), set(os.listdir("/tmp"))
    proc = start("virtnbdbackup", "-U", sshd.uri, "-d", vm.name, "-l", "copy", "-z", "9",
                 "-o", out, env=sshd.env)  # fmt: skip
    with frozen_while(proc, lambda: job_running(vm)):
        assert job_running(vm), "the backup was frozen while its job runs"
        pids = {qemu_pid(vm), proc.pid, *descendants(proc.pid), *descendants(sshd.proc.pid)}
        found = [*tree(out), *new_entries(var_tmp), *new_entries(tmp, Path("/tmp"))]
        got = probe(found, pids)
    finish(proc)
    assert got == [], got

    proc = start("virtnbdrestore", "-U", sshd.uri, "-i", out, "-o", restored, env=sshd.env)

    with frozen_while(proc, lambda: listening(qemu_nbd_of(restored))[0]):
        pids = {proc.pid, *descendants(proc.pid), *qemu_nbd_of(restored)}
        found = [*tree(restored), *new_entries(var_tmp), *new_entries(tmp, Path("/tmp"))]
        got = probe(found, pids)
    finish(proc)
    assert got == []
    vm.dom.suspend()
    assert images_identical(vm.images["vda"], next(restored.glob("*.qcow2")))
    vm.dom.resume()
