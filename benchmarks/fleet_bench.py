"""Fleet benchmark: eight VMs, 1 GiB of data each, backed up one by one with
virtnbdbackup and then by virtnbdfleet with a global limit of 1, 2, 4 and 8.

The reference is cp of the same images into the same folder, then sync:
what writing the data costs on this disk. For each fleet run: the wall
time, its ratio to the sum of the single backups' wall times and to the
copy, the mean number of jobs running at once (from the ledger), the CPU
time of the whole process tree, and the peak
RSS of the fleet process itself (from the ledger: getrusage of the fleet
process, its children not included) and of the largest process of the tree
(wait4). Every fleet run writes full backups of all eight VMs into a fresh
root, which is removed after it; the fleet's ledger must show eight ok rows.

Run as root after scripts/setup.sh (about 5 minutes, 9 GiB of disk):
    venv/env/bin/python benchmarks/fleet_bench.py [--vms 8] [--data-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import libvirt

MiB = 1024**2
BIN = Path(sys.executable).parent
# Not "vnbt": the integration suite removes leftover VMs with that prefix.
PREFIX = "virtnbdbench-fleet-"
IMAGES = Path("/var/lib/libvirt/images")

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@dataclass
class Result:
    name: str
    jobs: int | None
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float  # largest process of the tree
    fleet_rss_mib: float | None = None  # the fleet process alone
    ratio: float | None = None  # to the sum of the single backups
    cp_ratio: float | None = None  # to cp + sync of the same images
    concurrency: float | None = None  # sum of the jobs' durations / wall time


def timed(argv: list[str | Path]) -> tuple[float, float, float, str]:
    """Run ``argv``; (wall s, CPU s of the tree, peak RSS MiB of its largest process, stderr)."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        err.seek(0)
        text = err.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{argv[0]} failed ({code}):\n{text}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, text


def make_vms(conn: libvirt.virConnect, run: str, count: int, data_mib: int) -> list[str]:
    folder = IMAGES / f"{PREFIX}{run}"
    folder.mkdir(mode=0o755)
    names = []
    for i in range(count):
        name = f"{PREFIX}{run}-{i}"
        image = folder / f"{name}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", image, f"{data_mib + 64}M"], check=True
        )
        writes = []
        for chunk in range(data_mib // 64):  # a different pattern every 64 MiB
            writes += ["-c", f"write -P {(i * 37 + chunk) % 251 + 1} {chunk * 64}M 64M"]
        subprocess.run(["qemu-io", "-f", "qcow2", *writes, image], check=True, capture_output=True)
        xml = f"""<domain type='{"kvm" if os.access("/dev/kvm", os.W_OK) else "qemu"}'>
          <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='q35'>hvm</type></os>
          <devices><disk type='file' device='disk'>
            <driver name='qemu' type='qcow2'/><source file='{image}'/>
            <target dev='vda' bus='virtio'/></disk></devices></domain>"""
        conn.defineXML(xml).create()
        names.append(name)
    subprocess.run(["sync"], check=True)
    return names


def remove_vms(conn: libvirt.virConnect, run: str) -> None:
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(f"{PREFIX}{run}-"):
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    shutil.rmtree(IMAGES / f"{PREFIX}{run}", ignore_errors=True)


def ledger_check(root: Path, count: int) -> tuple[float, float]:
    """(the fleet process's own peak RSS in MiB, sum of the jobs' durations);
    every VM must be ok."""
    db = sqlite3.connect(root / "virtnbdfleet.sqlite")
    rows = db.execute("SELECT state, duration FROM jobs").fetchall()
    (peak,) = db.execute("SELECT peak_rss_kib FROM runs").fetchone()
    db.close()
    if [r[0] for r in rows] != ["ok"] * count:
        raise SystemExit(f"fleet run in {root}: states {rows}")
    return float(peak) / 1024, sum(float(r[1]) for r in rows)


def copy_reference(run: str, work: Path) -> Result:
    """cp of the VMs' images into the work folder and sync: what writing the
    same amount of data costs on this disk, without NBD or the format."""
    dest = work / "cp"
    dest.mkdir()
    images = sorted((IMAGES / f"{PREFIX}{run}").glob("*.qcow2"))
    subprocess.run(["sync"], check=True)
    wall, cpu, rss, _err = timed(["sh", "-c", 'cp "$@" "$0" && sync', dest, *images])
    shutil.rmtree(dest)
    return Result("cp + sync of the images (disk limit)", None, wall, cpu, rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=8)
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--limits", default="1,2,4,8", help="global limits to run with")
    parser.add_argument("--work", default="/var/tmp", help="folder for the backups")
    parser.add_argument("--json", default=str(Path(__file__).with_name("fleet_results.json")))
    args = parser.parse_args()

    conn = libvirt.open("qemu:///system")
    run = uuid.uuid4().hex[:6]
    work = Path(tempfile.mkdtemp(prefix="virtnbdbench-fleet.", dir=args.work))
    results: list[Result] = []
    try:
        print(f"making {args.vms} VMs with {args.data_mib} MiB of data each ...", flush=True)
        names = make_vms(conn, run, args.vms, args.data_mib)
        reference = copy_reference(run, work)
        results.append(reference)
        singles = []
        for name in names:
            out = work / "single" / name
            wall, cpu, rss, _err = timed(
                [BIN / "virtnbdbackup", "-d", name, "-l", "full", "-o", out, "-n"]
            )
            singles.append(Result(f"single {name}", None, wall, cpu, rss))
            shutil.rmtree(out)
        total = sum(r.seconds for r in singles)
        results.append(
            Result(
                f"sum of {len(singles)} single backups",
                None,
                total,
                sum(r.cpu_seconds for r in singles),
                max(r.peak_rss_mib for r in singles),
                cp_ratio=total / reference.seconds,
            )
        )
        for limit in (int(x) for x in args.limits.split(",")):
            root = work / f"fleet-{limit}"
            wall, cpu, rss, _err = timed(
                [BIN / "virtnbdfleet", "backup", "-o", root, "--select", f"{PREFIX}{run}-*",
                 "--jobs", limit, "--host-jobs", limit, "--quiet"]
            )  # fmt: skip
            fleet_rss, busy = ledger_check(root, len(names))
            results.append(
                Result(
                    f"fleet --jobs {limit}",
                    limit,
                    wall,
                    cpu,
                    rss,
                    fleet_rss,
                    wall / total,
                    wall / reference.seconds,
                    busy / wall,
                )
            )
            shutil.rmtree(root)
    finally:
        remove_vms(conn, run)
        shutil.rmtree(work, ignore_errors=True)
        conn.close()

    data_gib = args.vms * args.data_mib / 1024
    print(f"\n{args.vms} VMs x {args.data_mib} MiB = {data_gib:.0f} GiB, full backups, "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print("| run | wall s | GiB/s | ratio to sum of singles | ratio to cp | jobs at once "
          "(mean) | CPU s | fleet RSS MiB | largest process RSS MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(value: float | None, form: str) -> str:
        return format(value, form) if value is not None else ""

    for r in results:
        cells = [
            r.name,
            f"{r.seconds:.1f}",
            f"{data_gib / r.seconds:.2f}",
            cell(r.ratio, ".2f"),
            cell(r.cp_ratio, ".2f"),
            cell(r.concurrency, ".1f"),
            f"{r.cpu_seconds:.1f}",
            cell(r.fleet_rss_mib, ".0f"),
            f"{r.peak_rss_mib:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    Path(args.json).write_text(
        json.dumps(
            {
                "host": platform.node(),
                "cores": os.cpu_count(),
                "vms": args.vms,
                "data_mib": args.data_mib,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
