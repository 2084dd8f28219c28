"""virtnbdprune benchmark: merge throughput and RSS against cp, and storage saved.

1. Merge: a chain of a 4 GiB full (data runs of 256 MiB with holes between)
   and 7 incs of 64 MiB each (1 MiB extents at random offsets, some over
   each other) is written with the stream writer, plain and lz4. The whole
   prune (``--keep-last 1``: everything merged into the newest inc, the
   file written, synced, checked against the chain by map and sample,
   committed) runs in a child process, timed with its peak RSS (wait4); as
   the reference, ``cp`` copies the same bytes (every file of the chain,
   into one file on the same disk) and ``sync`` writes them out. Both run
   with a warm page cache (the chain was just written or read).

2. Storage: a year of simulated daily changes of a disk (a hot set that
   changes often and a cold rest) as a forever chain, pruned at the end
   with ``--keep-daily 7 --keep-weekly 4 --keep-monthly 12``, against
   keeping monthly chains for the year (a full at each month's start and
   every inc of the month). Both sizes come from the same simulated incs:
   the monthly fulls are the allocated data at each month's start.

Run after scripts/setup.sh:  venv/env/bin/python benchmarks/prune_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from libvirtnbdbackup.format.meta import StreamMeta
from libvirtnbdbackup.format.writer import StreamWriter

MiB = 1024**2
GiB = 1024**3
START = datetime(2026, 1, 1, 1)


@dataclass
class Timed:
    seconds: float
    peak_rss_mib: float


def run_child(argv: list[str]) -> Timed:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed: {stderr}")
    return Timed(seconds, usage.ru_maxrss / 1024)


def write_stream(
    path: Path,
    disk_size: int,
    frames: list[tuple[int, int, bytes | None]],
    *,
    number: int,
    when: datetime,
    compressed: int | bool,
) -> int:
    """A data file: ``frames`` are (offset, length, fill or None for zero)."""
    incremental = number > 0
    data_size = sum(n for _o, n, fill in frames if fill is not None)
    meta = StreamMeta(
        virtual_size=disk_size,
        data_size=data_size,
        disk_name="vda",
        disk_format="qcow2",
        checkpoint_name=f"virtnbdbackup.{number}",
        parent_checkpoint=f"virtnbdbackup.{number - 1}" if incremental else "",
        incremental=incremental,
        compressed=compressed,
        date=when.isoformat(timespec="microseconds"),
    )
    with open(path, "wb") as fh:
        writer = StreamWriter(fh, meta)
        for offset, length, fill in frames:
            if fill is None:
                writer.zero(offset, length)
            else:
                writer.data(offset, length, _pattern(fill, length))
        checksum = writer.finish()
        index = writer.index(path.name)
    Path(f"{path}.chksum").write_text(str(checksum))
    Path(f"{path}.idx").write_bytes(index.to_bytes())
    epoch = when.timestamp()
    os.utime(path, (epoch, epoch))
    return path.stat().st_size


def _pattern(seed: bytes, length: int) -> Iterator[bytes]:
    """``length`` bytes in 4 MiB blocks, each starting with its offset (so no two equal)."""
    for pos in range(0, length, 4 * MiB):
        n = min(4 * MiB, length - pos)
        head = pos.to_bytes(8, "little") + seed[:1]
        yield (head + _BASE[len(head) : n])[:n]


_BASE = b""


def _base(compressible: bool) -> bytes:
    rng = random.Random(7)
    if compressible:  # text-like: lz4 level 2 packs it to about half
        words = [bytes(rng.choice(b"abcdefghij klmnop") for _ in range(8)) for _ in range(512)]
        return b"".join(rng.choice(words) for _ in range(4 * MiB // 8))[: 4 * MiB]
    return rng.randbytes(4 * MiB)


def make_chain(
    folder: Path, compressed: int | bool, full_size: int, incs: int, scattered: bool = False
) -> list[Path]:
    global _BASE
    _BASE = _base(compressed is not False)
    rng = random.Random(1)
    disk = full_size + full_size // 8
    frames: list[tuple[int, int, bytes | None]] = []
    pos = 0
    run = 256 * MiB
    while pos < disk:
        data = min(run, disk - pos)
        frames.append((pos, data, b"F"))
        pos += data
        hole = min(run // 8, disk - pos)
        if hole:
            frames.append((pos, hole, None))
            pos += hole
    folder.mkdir(parents=True)
    paths = [folder / "vda.full.data"]
    write_stream(paths[0], disk, frames, number=0, when=START, compressed=compressed)
    for n in range(1, incs + 1):
        # 64 writes of 1 MiB a day: with ``scattered`` anywhere on the disk
        # (every LZ4 piece of the full gets cut), else 60 in a hot 256 MiB
        # region and 4 anywhere, as daily changes tend to be.
        if scattered:
            offsets = sorted(rng.sample(range(0, disk // MiB), 64))
        else:
            hot = range(disk // MiB // 3, disk // MiB // 3 + 256)
            offsets = sorted(set(rng.sample(hot, 60)) | set(rng.sample(range(disk // MiB), 4)))
        inc_frames: list[tuple[int, int, bytes | None]] = [
            (o * MiB, MiB, bytes([n])) for o in offsets
        ]
        path = folder / f"vda.inc.virtnbdbackup.{n}.data"
        when = START + timedelta(days=n)
        write_stream(path, disk, inc_frames, number=n, when=when, compressed=compressed)
        paths.append(path)
    (folder / "benchvm.cpt").write_text(json.dumps([f"virtnbdbackup.{n}" for n in range(incs + 1)]))
    return paths


def bench_merge(
    work: Path, compressed: int | bool, full_size: int, scattered: bool, rounds: int
) -> dict[str, float]:
    """The best of ``rounds`` of cp and of a prune, alternating (the host is shared)."""
    folder = work / f"chain-{'lz4' if compressed is not False else 'plain'}"
    paths = make_chain(folder, compressed, full_size, 7, scattered)
    chain_bytes = sum(p.stat().st_size for p in paths)
    subprocess.run(["sync"], check=True)
    cps, prunes = [], []
    merged_size = 0
    for n in range(rounds):
        # cp of the same bytes into one file on the same disk, written out
        copy = work / "cp-target"
        files = " ".join(str(p) for p in paths)
        cps.append(run_child(["sh", "-c", f"cat {files} > {copy} && sync"]))
        copy.unlink()
        # A clone of hard links: a prune renames and removes, never writes into a file.
        clone = work / f"clone{n}"
        subprocess.run(["cp", "-al", str(folder), str(clone)], check=True)
        prune = str(Path(sys.executable).parent / "virtnbdprune")
        prunes.append(run_child([prune, "-i", str(clone), "-n", "--quiet", "--keep-last", "1"]))
        merged_size = (clone / "vda.full.data").stat().st_size
        shutil.rmtree(clone)
    cp = min(cps, key=lambda t: t.seconds)
    best = min(prunes, key=lambda t: t.seconds)
    shutil.rmtree(folder)
    return {
        "chain_mib": chain_bytes / MiB,
        "merged_mib": merged_size / MiB,
        "cp_s": cp.seconds,
        "prune_s": best.seconds,
        "ratio": best.seconds / cp.seconds,
        "prune_mib_s": chain_bytes / MiB / best.seconds,
        "cp_mib_s": chain_bytes / MiB / cp.seconds,
        "peak_rss_mib": max(t.peak_rss_mib for t in prunes),
    }


def bench_storage(work: Path, disk: int, hot: int, daily: int, days: int) -> dict[str, float]:
    """A year of daily incs: forever chain pruned vs monthly chains kept."""
    from libvirtnbdbackup.jobs.keeprules import KeepRules
    from libvirtnbdbackup.jobs.prune import prune

    global _BASE
    _BASE = _base(False)
    rng = random.Random(3)
    folder = work / "year"
    folder.mkdir()
    blocks = disk // MiB
    allocated = set(range(blocks // 2))  # half the disk holds data at the start
    full_frames = [(b * MiB, MiB, b"F") for b in sorted(allocated)]
    full_frames = _joined(full_frames)
    write_stream(
        folder / "vda.full.data", disk, full_frames, number=0, when=START, compressed=False
    )
    inc_sizes = []
    fulls_at_month_start = [len(allocated) * MiB]
    for day in range(1, days + 1):
        when = START + timedelta(days=day)
        changed = set()
        while len(changed) < daily // MiB:
            # 80 % of the changes in a hot set, the rest anywhere
            b = rng.randrange(hot // MiB) if rng.random() < 0.8 else rng.randrange(blocks)
            changed.add(b)
        allocated |= changed
        frames = _joined([(b * MiB, MiB, bytes([day % 256])) for b in sorted(changed)])
        path = folder / f"vda.inc.virtnbdbackup.{day}.data"
        inc_sizes.append(write_stream(path, disk, frames, number=day, when=when, compressed=False))
        if when.month != (when - timedelta(days=1)).month:
            fulls_at_month_start.append(len(allocated) * MiB)
    (folder / "benchvm.cpt").write_text(json.dumps([f"virtnbdbackup.{n}" for n in range(days + 1)]))
    before = _folder_bytes(folder)
    rules = KeepRules(daily=7, weekly=4, monthly=12)
    started = time.perf_counter()
    prune(folder, rules)
    seconds = time.perf_counter() - started
    after = _folder_bytes(folder)
    monthly = sum(fulls_at_month_start[:12]) + sum(inc_sizes)
    kept = len(list(folder.glob("*.data")))
    shutil.rmtree(folder)
    return {
        "days": days,
        "forever_unpruned_mib": before / MiB,
        "forever_pruned_mib": after / MiB,
        "monthly_chains_mib": monthly / MiB,
        "saved_vs_monthly": 1 - after / monthly,
        "files_kept": kept,
        "prune_s": seconds,
    }


def _joined(frames: list[tuple[int, int, bytes | None]]) -> list[tuple[int, int, bytes | None]]:
    out: list[tuple[int, int, bytes | None]] = []
    for o, n, fill in frames:
        if out and out[-1][0] + out[-1][1] == o and out[-1][2] == fill:
            out[-1] = (out[-1][0], out[-1][1] + n, fill)
        else:
            out.append((o, n, fill))
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 GiB full, 90 days")
    parser.add_argument("--dir", default="/var/tmp", help="where to build the chains")
    parser.add_argument("--rounds", type=int, default=2, help="runs of cp and prune each")
    parser.add_argument("--skip-storage", action="store_true", help="only the merge runs")
    args = parser.parse_args()
    full = 1 * GiB if args.quick else 4 * GiB
    days = 90 if args.quick else 365
    with tempfile.TemporaryDirectory(prefix="prune-bench.", dir=args.dir) as tmp:
        work = Path(tmp)
        report = {
            "merge_plain": bench_merge(work, False, full, False, args.rounds),
            "merge_plain_scattered": bench_merge(work, False, full, True, args.rounds),
            "merge_lz4": bench_merge(work, 2, full, False, args.rounds),
            "merge_lz4_scattered": bench_merge(work, 2, full, True, args.rounds),
            "storage": None
            if args.skip_storage
            else bench_storage(work, 512 * MiB, 64 * MiB, 4 * MiB, days),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
