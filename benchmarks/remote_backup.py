"""Remote backup speed against the limit, measured in one run.

For one disk of a shut-off domain on a remote hypervisor, times:

- ``nbdcopy`` reading the disk from a qemu-nbd on the hypervisor over TCP
  into a file next to the backups (the limit: the same server, network and
  disk, a C client), and into ``null:`` (the network alone);
- ``nbdcopy`` from the same qemu-nbd on a unix socket forwarded over SSH
  (the SSH channel alone, into ``null:``);
- ``virtnbdbackup -l copy`` of that disk over each transport: the default
  (NBD on a unix socket forwarded through the SSH connection), plain NBD
  over TCP (``-P``), and ``--tls`` when ``--tls-cert`` is given;

and prints each one's best throughput of two rounds and its ratio to the
limit. Ratios, not absolute figures, are what carries over between runs on
a shared host. The virtnbdbackup times are those of the whole command:
connecting to libvirt and SSH and saving the image information included.

    venv/env/bin/python benchmarks/remote_backup.py -U qemu+ssh://root@hv1/system -d vm1
    venv/env/bin/python benchmarks/remote_backup.py --lab 512   # throw-away VM and sshd here

``--lab MIB`` builds what the tests use: a VM with MIB MiB of random data,
a private sshd on 127.0.0.1 and, with ``--tls``, test certificates in
/etc/pki/qemu for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libvirtnbdbackup.adapters import qemu  # noqa: E402
from libvirtnbdbackup.adapters.domainxml import parse_disks  # noqa: E402
from libvirtnbdbackup.jobs.remote import Remote, RemoteOptions  # noqa: E402

BIN = Path(sys.executable).parent
REPEAT = 2


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return time.monotonic() - started


def data_bytes(info: dict[str, object]) -> int:
    size = info.get("actual-size")
    return int(size) if isinstance(size, int) else 0


def measure(uri: str, domain: str, disk: str | None, port: int, tls_cert: str | None,
            env: dict[str, str] | None) -> None:  # fmt: skip
    conn = libvirt.open(uri)
    dom = conn.lookupByName(domain)
    if dom.isActive():
        raise SystemExit(f"{domain} must be shut off (both readers use qemu-nbd)")
    disks = [d for d in parse_disks(dom.XMLDesc(0)) if d.device == "disk" and d.path]
    target = next((d for d in disks if d.target == disk), disks[0]) if disk else disks[0]
    conn.close()
    assert target.path is not None
    remote = Remote(uri, RemoteOptions(nbd_port=port))
    host = remote.host()
    out = Path(tempfile.mkdtemp(prefix="vnbt-bench.", dir=os.environ.get("TMPDIR", "/var/tmp")))
    rows: list[tuple[str, float]] = []
    try:
        used = data_bytes(qemu.image_info(target.path, host))
        runs: list[tuple[str, list[str]]] = [
            ("virtnbdbackup over SSH", []),
            ("virtnbdbackup -P (TCP)", ["-P", str(port)]),
        ]
        if tls_cert:
            runs.append(("virtnbdbackup --tls", ["-P", str(port), "--tls", "--tls-cert", tls_cert]))
        for attempt in range(REPEAT):
            # The limit: nbdcopy from the same remote qemu-nbd, over one connection as
            # virtnbdbackup uses per disk, into a sparse file in the same folder, flushed.
            for sink in ("null:", str(out / "limit.raw")):
                with qemu.nbd_server(target.path, target.format, readonly=True,
                                     export=target.target, host=host, tcp=remote.nbd_address(),
                                     bind=remote.bind_address()) as address:  # fmt: skip
                    cmd = ["nbdcopy", "--connections=1", "--flush", address.uri(target.target)]
                    name = "nbdcopy to null:" if sink == "null:" else "nbdcopy to a file (limit)"
                    rows.append((name, timed([*cmd, sink], env)))
                Path(out / "limit.raw").unlink(missing_ok=True)
            with qemu.nbd_server(target.path, target.format, readonly=True,
                                 export=target.target, host=host) as address:  # fmt: skip
                cmd = ["nbdcopy", "--connections=1", address.uri(target.target), "null:"]
                rows.append(("nbdcopy over SSH to null:", timed(cmd, env)))
            for name, extra in runs:
                backup = out / f"backup{attempt}"
                cmd = [str(BIN / "virtnbdbackup"), "-U", uri, "-d", domain, "-l", "copy", "-n",
                       "-i", target.target, "-o", str(backup), *extra]  # fmt: skip
                rows.append((name, timed(cmd, env)))
                shutil.rmtree(backup, ignore_errors=True)
    finally:
        host.close()
        shutil.rmtree(out, ignore_errors=True)
    best: dict[str, float] = {}
    for name, seconds in rows:
        best[name] = min(seconds, best.get(name, seconds))
    limit = best["nbdcopy to a file (limit)"]
    mib = used / 2**20
    print(f"disk {target.target} of {domain}: {mib:.0f} MiB allocated; best of {REPEAT} runs")
    for name, seconds in best.items():
        print(f"{name:28} {seconds:7.2f} s {mib / seconds:8.1f} MiB/s  ratio {limit / seconds:.2f}")


@contextlib.contextmanager
def lab(mib: int, tls: bool) -> Iterator[tuple[str, str, dict[str, str], str | None]]:
    from tests.integration.remotelab import qemu_pki, ssh_server
    from tests.integration.vmlab import DiskSpec, GiB, create_vm, remove_vm

    conn = libvirt.open("qemu:///system")
    vm = create_vm(conn, [DiskSpec("vda", 2 * GiB, random_mib=mib)], cdrom=False, start=False)
    pki = qemu_pki() if tls else contextlib.nullcontext()
    try:
        with ssh_server() as sshd, pki as certs:
            os.environ["PATH"] = sshd.env["PATH"]  # libvirt's ssh, too, uses the test's wrapper
            yield sshd.uri, vm.name, sshd.env, str(certs) if certs else None
    finally:
        remove_vm(vm)
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-U", "--uri")
    parser.add_argument("-d", "--domain")
    parser.add_argument("-i", "--disk", default=None)
    parser.add_argument("-P", "--nbd-port", type=int, default=10809)
    parser.add_argument("--tls-cert", default=None, help="also measure --tls with these")
    parser.add_argument("--lab", type=int, metavar="MIB", help="throw-away VM and sshd here")
    parser.add_argument("--tls", action="store_true", help="with --lab: test certificates")
    args = parser.parse_args()
    if args.lab:
        with lab(args.lab, args.tls) as (uri, domain, env, certs):
            measure(uri, domain, None, args.nbd_port, certs, env)
    elif args.uri and args.domain:
        measure(args.uri, args.domain, args.disk, args.nbd_port, args.tls_cert, None)
    else:
        parser.error("give -U and -d, or --lab")


if __name__ == "__main__":
    main()
