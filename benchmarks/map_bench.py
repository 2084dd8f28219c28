#!/usr/bin/env python3
"""virtnbdmap on a 4 GiB disk: open time and read throughput against nbdcopy.

Run as root from the repository (``venv/env/bin/python benchmarks/map_bench.py``).
A throw-away VM gets a 4 GiB qcow2 disk: 1 GiB of random data, 2.5 GiB of
compressible patterns, 0.5 GiB with 64 KiB written every 256 KiB. It is backed up full, once
plain and once with ``-z``; each backup is then mapped with ``virtnbdmap
--listen`` and read whole with ``nbdcopy ... null:``. The limit is nbdcopy
reading the original image through ``qemu-nbd`` in the same run. Printed:
seconds and MiB/s of each read and its ratio to the limit, and the open
time of each chain (with the index side files, and rebuilt without them).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VNBT_LAB", "mapbench")  # its own VM prefix and lab folder

from libvirtnbdbackup.format.chainimage import ChainImage  # noqa: E402
from libvirtnbdbackup.format.index import open_index  # noqa: E402
from tests.integration.vmlab import (  # noqa: E402
    BIN,
    DiskSpec,
    GiB,
    MiB,
    create_vm,
    ensure_libvirtd,
    remove_vm,
)

SIZE = 4 * GiB


def disk_spec() -> DiskSpec:
    writes = [f"write -P {0x10 + i} {GiB + i * 64 * MiB} 64M" for i in range(40)]  # 2.5 GiB
    # The last 512 MiB fragmented: 64 KiB written every 256 KiB (2048 data extents).
    start = SIZE - 512 * MiB
    writes += [f"write -P 0x5a {start + i * 256 * 1024} 64K" for i in range(2048)]
    return DiskSpec("vda", SIZE, writes=writes, random_mib=1024)


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def timed_copy(uri: str) -> float:
    started = time.monotonic()
    run("nbdcopy", uri, "null:")
    return time.monotonic() - started


@contextlib.contextmanager
def qemu_nbd(image: Path, socket: Path) -> Iterator[str]:
    """The source image served read-only, as the limit to compare with."""
    opts = f"driver=qcow2,file.driver=file,file.filename={image},file.locking=off"
    cmd = ["qemu-nbd", "--read-only", "--persistent", "--shared", "8", "--image-opts", opts]
    proc = subprocess.Popen([*cmd, "--socket", str(socket)])
    try:
        deadline = time.monotonic() + 30
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={socket}"
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def mapped(folder: Path, socket: Path, *extra: str) -> Iterator[tuple[str, float]]:
    """virtnbdmap --listen; yields the URI and the seconds until it was ready."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "virtnbdmap"), "-i", str(folder), "--listen", f"unix:{socket}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = ""
        for line in proc.stdout:
            if line.startswith("export "):
                uri = line.split(": ", 1)[1].strip()
            if line.startswith("ready:"):
                break
        else:
            error = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"virtnbdmap ended with {proc.wait()}: {error}")
        yield uri, time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def open_seconds(folder: Path) -> float:
    paths = sorted(str(p) for p in folder.glob("vda.*.data"))
    started = time.monotonic()
    ChainImage(paths).close()
    return time.monotonic() - started


def open_extents(path: Path) -> list[object]:
    with open(path, "rb") as fh:
        return list(open_index(str(path), fh).extents)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the VM and the backups")
    args = parser.parse_args()
    conn = ensure_libvirtd()
    vm = create_vm(conn, [disk_spec()], cdrom=False)
    work = Path(tempfile.mkdtemp(prefix="map-bench.", dir="/var/tmp"))  # short socket paths
    rows: list[tuple[str, float, float]] = []
    try:
        folders = {}
        for label, extra in (("plain", []), ("lz4", ["-z"])):
            folders[label] = work / label
            backup = [BIN / "virtnbdbackup", "-d", vm.name, "-l", "full", "-n", *extra]
            run(*backup, "-o", folders[label])
        with qemu_nbd(vm.images["vda"], work / "source.sock") as uri:
            timed_copy(uri)  # warm the page cache for both sides alike
            limit = timed_copy(uri)
        rows.append(("nbdcopy <- qemu-nbd (source image)", limit, 0.0))
        for label, folder in folders.items():
            for mode, extra in (("readonly", ["-r"]), ("cow", [])):
                with mapped(folder, work / f"{label}-{mode}.sock", *extra) as (uri, ready):
                    timed_copy(uri)
                    seconds = timed_copy(uri)
                rows.append((f"nbdcopy <- virtnbdmap {label} {mode}", seconds, ready))
        print(f"\n4 GiB disk, {SIZE // MiB} MiB virtual; read whole with nbdcopy to null:\n")
        print(f"{'read':44} {'seconds':>8} {'MiB/s':>8} {'ratio':>6} {'ready s':>8}")
        for name, seconds, ready in rows:
            rate = SIZE / MiB / seconds
            ready_text = f"{ready:8.2f}" if ready else f"{'':8}"
            print(f"{name:44} {seconds:8.2f} {rate:8.0f} {limit / seconds:6.2f} {ready_text}")
        seconds = {name: took for name, took, _ready in rows}
        for mode in ("readonly", "cow"):
            plain = seconds[f"nbdcopy <- virtnbdmap plain {mode}"]
            lz4 = seconds[f"nbdcopy <- virtnbdmap lz4 {mode}"]
            print(f"lz4 map / plain map, {mode}: {plain / lz4:.2f} (target >= 0.6)")
        print("\nopening a chain (ChainImage, in process):")
        for label, folder in folders.items():
            with_index = open_seconds(folder)
            for side in folder.glob("*.idx"):
                side.unlink()
            rebuilt = open_seconds(folder)  # builds and saves the index again
            size = sum(p.stat().st_size for p in folder.glob("*.data"))
            frames = sum(len(open_extents(p)) for p in folder.glob("*.data"))
            print(
                f"  {label:6} {size / MiB:6.0f} MiB, {frames} frames: {with_index:.3f} s with "
                f"the index, {rebuilt:.3f} s rebuilding it from the frame headers"
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            remove_vm(vm)
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
