"""Speed benchmark: our backup and restore against nbdcopy and qemu-img on one VM.

One run builds a qcow2 disk of known content from a fixed seed, defines and
starts a VM (firmware only) on it, and times, each as a child process whose
peak RSS is read with wait4():

- the limits: nbdcopy from the libvirt backup export to a sparse file, and
  nbdcopy / qemu-img convert of that file into a new qcow2 image;
- virtnbdbackup full, full with lz4 (level 2, the -z default, and level 9),
  and inc after 64 scattered 1 MiB writes;
- virtnbdrestore of the full alone, of full+inc, of the lz4 full, and
  -o verify of the full alone, of the lz4 full and of full+inc.

It prints a table (wall time, MiB/s, peak RSS, ratio to the limit) and writes
the same as JSON. It also counts each run's CPU seconds, and QEMU's for the
steps that read the VM's disk: their sum over the cores is the least wall
time any scheduling of that work can take on this host (the CPU floor).
The restored images are compared with qemu-img compare, so a fast but
wrong run does not pass unnoticed. The VM and its files are
removed at the end.

Run as root after scripts/setup.sh:  venv/env/bin/python benchmarks/bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libvirt

from libvirtnbdbackup.adapters.domainxml import parse_disks
from libvirtnbdbackup.adapters.nbdclient import NbdAddress
from libvirtnbdbackup.adapters.virt import backup_xml

MiB = 1024**2
GiB = 1024**3
CORES = os.cpu_count() or 1
BIN = Path(sys.executable).parent
# Not "vnbt-": the integration suite removes leftover VMs with that prefix.
PREFIX = "virtnbdbench-"
IMAGES = Path("/var/lib/libvirt/images")

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@dataclass
class Step:
    name: str
    seconds: float
    data_mib: float
    peak_rss_mib: float
    limit: str | None = None
    ratio: float | None = None
    target: str = ""
    runs: list[float] = field(default_factory=list)
    # CPU seconds per run: the command's with its children, and QEMU's.
    cpu_runs: list[float] = field(default_factory=list)
    qemu_cpu_runs: list[float] = field(default_factory=list)

    @property
    def cpu_floor(self) -> float:
        """The least wall time the run with the least CPU could take on all cores."""
        return min(map(sum, zip(self.cpu_runs, self.qemu_cpu_runs, strict=True))) / CORES

    @property
    def mib_s(self) -> float:
        return self.data_mib / self.seconds if self.seconds else 0.0


# -- the disk ------------------------------------------------------------------


def text_blocks(rng: random.Random, count: int, size: int) -> list[bytes]:
    """Distinct blocks of log-like text: compressible, but not trivially."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(3000)]
    blocks = []
    for _ in range(count):
        lines: list[str] = []
        length = 0
        while length < size:
            line = f"{rng.randint(0, 10**9):09d} {' '.join(rng.choices(words, k=12))}\n"
            lines.append(line)
            length += len(line)
        blocks.append("".join(lines).encode()[:size])
    return blocks


def build_disk(path: Path, size: int, seed: int) -> None:
    """The issue's data, whatever the disk size: 768 MiB random at 512 MiB,
    768 MiB of text at 2 GiB, 20,000 random 4 KiB writes over the whole disk
    (each allocating a qcow2 cluster)."""
    rng = random.Random(seed)
    raw = path.with_suffix(".raw")
    chunk = 4 * MiB
    blocks = text_blocks(rng, 16, chunk)
    with open(raw, "wb") as fh:
        os.truncate(fh.fileno(), size)
        for off in range(512 * MiB, (512 + 768) * MiB, chunk):
            os.pwrite(fh.fileno(), rng.randbytes(chunk), off)
        for off in range(2048 * MiB, (2048 + 768) * MiB, chunk):
            os.pwrite(fh.fileno(), rng.choice(blocks), off)
        for _ in range(20000):
            os.pwrite(fh.fileno(), rng.randbytes(4096), rng.randrange(size // 4096) * 4096)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()


def domain_xml(name: str, disk: Path) -> str:
    kvm = os.path.exists("/dev/kvm")
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
      <name>{name}</name>
      <memory unit='MiB'>128</memory>
      <vcpu>1</vcpu>
      <os><type arch='x86_64' machine='q35'>hvm</type></os>
      <devices>
        <disk type='file' device='disk'>
          <driver name='qemu' type='qcow2' discard='unmap'/>
          <source file='{disk}'/>
          <target dev='vda' bus='virtio'/>
        </disk>
      </devices>
    </domain>"""


# -- running and timing ----------------------------------------------------------


@dataclass
class Run:
    seconds: float
    rss_mib: float
    cpu: float  # user and system seconds of the command and its children
    qemu_cpu: float = 0.0  # the VM's QEMU, for steps that read its disk


def timed(cmd: list[str], **kw: object) -> Run:
    """Run ``cmd``; its wall time, peak RSS in MiB and CPU seconds.

    The RSS comes from wait4(): the largest of the command and the children
    it waited for. Linux starts it at the RSS of this process when the child
    is forked, which is why this process keeps small (``floor_mib``).
    """
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    assert proc.stderr is not None
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return Run(seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)


def convert(raw: Path, folder: Path, cache: str) -> Run:
    """``qemu-img convert`` of ``raw`` into ``folder/conv.qcow2``; ``unsafe``
    is its default cache mode (nothing flushed), ``writeback`` flushes."""
    out = str(folder / "conv.qcow2")
    return timed(["qemu-img", "convert", "-t", cache, "-f", "raw", "-O", "qcow2", str(raw), out])


def tool(name: str, *args: str | Path) -> list[str]:
    return [str(BIN / name), *[str(a) for a in args]]


def allocated_mib(image: Path) -> float:
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"]) / MiB


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)]).returncode == 0


class Bench:
    def __init__(self, size: int, seed: int, workdir: Path | None, repeat: int) -> None:
        self.size = size
        self.repeat = repeat
        self.seed = seed
        self.name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        self.folder = workdir or IMAGES / self.name
        self.steps: list[Step] = []
        self.conn = libvirt.open("qemu:///system")
        self.dom: libvirt.virDomain | None = None

    def run(self) -> None:
        self.folder.mkdir(parents=True)
        os.chmod(self.folder, 0o755)
        disk = self.folder / f"{self.name}.qcow2"
        print(f"bench: building a {self.size // GiB} GiB disk (seed {self.seed}) ...", flush=True)
        # In a child process: this one stays small, as every command it
        # starts begins with a copy of its peak RSS (see timed()).
        subprocess.run(
            [sys.executable, __file__, "--build-disk", str(disk), str(self.size), str(self.seed)],
            check=True,
        )
        os.sync()  # the new disk's writeback must not slow down the first steps
        data = allocated_mib(disk)
        print(f"bench: {data:.0f} MiB allocated; starting VM {self.name}", flush=True)
        self.dom = self.conn.defineXML(domain_xml(self.name, disk))
        self.dom.create()
        w = self.folder

        export = w / "export.raw"
        full, lz4, lz4_9 = w / "full", w / "lz4", w / "lz4-9"
        level_9 = ("-n", "-z", "9", "-o")

        def backup(*args: str | Path) -> Run:
            return self.reading_vm(tool("virtnbdbackup", "-d", self.name, *args))

        # Each step runs `repeat` times, limits next to the steps they are
        # compared with; the fastest run counts (the least disturbed).
        for rep in range(self.repeat):
            export.unlink(missing_ok=True)
            self.record("nbdcopy export -> sparse file", data, self._nbdcopy_export(export))
            for out in (lz4, full):
                shutil.rmtree(out, ignore_errors=True)
            # lz4 first: the plain full that follows starts the chain the inc builds on.
            self.record(
                "backup full -z (lz4)",
                data,
                backup("-l", "full", "-z", "-o", lz4, "-n"),
            )
            if not rep:  # several times slower than level 2: once is enough to report
                self.record(
                    "backup full -z 9 (lz4 level 9)",
                    data,
                    backup("-l", "copy", *level_9, lz4_9),
                )
            self.record(
                "backup full",
                data,
                backup("-l", "full", "-o", full, "-n"),
            )
        # The full alone, for verify to compare with the lz4 full (the inc joins `full`).
        full_only = w / "full-only"
        full_only.mkdir()
        for path in full.glob("*.data*"):
            os.link(path, full_only / path.name)
        rng = random.Random(self.seed + 1)
        for i in range(64):
            offset = rng.randrange(self.size // MiB) * MiB
            self._hmp(f"write -P {0x40 + i} {offset} 1M")
        self.record(
            "backup inc (64 x 1 MiB)",
            64,
            backup("-l", "inc", "-o", full, "-n"),
        )
        chain_mib = sum(p.stat().st_size for p in full.glob("*.data")) / MiB
        copy = w / "copy.qcow2"
        until_0 = ("-n", "--until", "virtnbdbackup.0")
        for _rep in range(self.repeat):
            for scratch in ("conv.qcow2", "copy.qcow2", "restored", "restored-0", "restored-lz4"):
                shutil.rmtree(w / scratch, ignore_errors=True)
                (w / scratch).unlink(missing_ok=True)
            self.record("qemu-img convert file -> qcow2", data, convert(export, w, "unsafe"))
            # The same, made durable as a restore is: qemu-img flushes at the end.
            (w / "conv.qcow2").unlink()
            self.record(
                "qemu-img convert -t writeback (durable)", data, convert(export, w, "writeback")
            )
            self.record(
                "restore full",
                data,
                timed(tool("virtnbdrestore", "-i", full, "-o", w / "restored-0", *until_0)),
            )
            self.record(
                "restore full+inc",
                data,
                timed(tool("virtnbdrestore", "-i", full, "-o", w / "restored", "-n")),
            )
            self.record(
                "restore lz4 full",
                data,
                timed(tool("virtnbdrestore", "-i", lz4, "-o", w / "restored-lz4", "-n")),
            )
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(copy), str(self.size)], check=True
            )
            self.record(
                "nbdcopy file -> qcow2",
                data,
                timed(
                    [
                        "nbdcopy",
                        "--flush",
                        str(export),
                        "--",
                        "[",
                        "qemu-nbd",
                        "-f",
                        "qcow2",
                        str(copy),
                        "]",
                    ]
                ),
            )
            self.record(
                "verify full",
                data,
                timed(tool("virtnbdrestore", "-i", full_only, "-o", "verify")),
            )
            self.record(
                "verify lz4 full",
                data,
                timed(tool("virtnbdrestore", "-i", lz4, "-o", "verify")),
            )
            self.record(
                "verify full+inc",
                chain_mib,
                timed(tool("virtnbdrestore", "-i", full, "-o", "verify")),
            )
            self.record(
                "read data files (cat)",
                chain_mib,
                timed(["sh", "-c", f"cat {full}/*.data > /dev/null"]),
            )

        self.ratio("backup full", "nbdcopy export -> sparse file", "<= 1.15")
        self.ratio("restore full+inc", "qemu-img convert file -> qcow2", "<= 1.5")
        self.ratio("restore full", "qemu-img convert file -> qcow2", "<= 1.5")
        self.ratio("backup full -z (lz4)", "backup full", "<= 1.3")
        self.ratio("backup full -z 9 (lz4 level 9)", "backup full", "reported")
        self.ratio("restore lz4 full", "restore full", "<= 1.3")
        self.ratio("verify lz4 full", "verify full", "<= 1.5")
        self.ratio("verify full+inc", "read data files (cat)", "")
        self.by_name("backup inc (64 x 1 MiB)").target = "< 2 s"
        # Our restore writes through qemu-nbd, as nbdcopy into qcow2 does.
        self.extra_ratios = {
            "restore full+inc / qemu-img convert -t writeback": self.seconds("restore full+inc")
            / self.seconds("qemu-img convert -t writeback (durable)"),
            "restore full+inc / nbdcopy file -> qcow2": self.seconds("restore full+inc")
            / self.seconds("nbdcopy file -> qcow2"),
            "restore lz4 full / qemu-img convert": self.seconds("restore lz4 full")
            / self.seconds("qemu-img convert file -> qcow2"),
        }

        print("bench: checking the restored images ...", flush=True)
        self.checks = {
            "restore full+inc identical to the disk": identical(
                disk, next((w / "restored").glob("*.qcow2"))
            ),
            "restore full identical to the exported state": identical(
                export, next((w / "restored-0").glob("*.qcow2"))
            ),
            "restore lz4 identical to the exported state": identical(
                export, next((w / "restored-lz4").glob("*.qcow2"))
            ),
            "lz4 backup MiB": round(sum(p.stat().st_size for p in lz4.glob("*.data")) / MiB),
            "lz4 level 9 backup MiB": round(
                sum(p.stat().st_size for p in lz4_9.glob("*.data")) / MiB
            ),
        }

    def record(self, name: str, data_mib: float, run: Run) -> None:
        print(f"bench: {name}: {run.seconds:.2f} s, {run.rss_mib:.0f} MiB", flush=True)
        os.sync()  # no writeback of this step's output during the next one
        step = next((s for s in self.steps if s.name == name), None)
        if step is None:
            step = Step(name, run.seconds, data_mib, run.rss_mib)
            self.steps.append(step)
        step.runs.append(round(run.seconds, 3))
        step.cpu_runs.append(round(run.cpu, 3))
        step.qemu_cpu_runs.append(round(run.qemu_cpu, 3))
        step.seconds = min(step.seconds, run.seconds)
        step.peak_rss_mib = max(step.peak_rss_mib, run.rss_mib)

    def reading_vm(self, cmd: list[str]) -> Run:
        """``timed(cmd)`` for a command that reads the VM's disk through QEMU."""
        before = self._qemu_cpu()
        run = timed(cmd)
        run.qemu_cpu = self._qemu_cpu() - before
        return run

    def _qemu_cpu(self) -> float:
        pid = int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text())
        # utime and stime: fields 14 and 15, counted after the ")" ending the name
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def seconds(self, name: str) -> float:
        return self.by_name(name).seconds

    def by_name(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def ratio(self, name: str, limit: str, target: str) -> None:
        step = self.by_name(name)
        step.limit = limit
        step.ratio = step.seconds / self.by_name(limit).seconds
        step.target = target

    def _nbdcopy_export(self, dest: Path) -> Run:
        """A pull-mode backup job without checkpoint, read by nbdcopy."""
        assert self.dom is not None
        # QEMU creates these: in /var/tmp, as virtnbdbackup does, where it may.
        socket = f"/var/tmp/{self.name}.sock"
        disks = parse_disks(self.dom.XMLDesc(0))
        job = backup_xml(
            disks, disks, NbdAddress(socket=socket), {"vda": f"/var/tmp/{self.name}.scratch"}
        )
        self.dom.backupBegin(job, None, 0)
        try:
            return self.reading_vm(
                ["nbdcopy", "--flush", f"nbd+unix:///vda?socket={socket}", str(dest)]
            )
        finally:
            self.dom.abortJob()
            while self.dom.jobStats(0).get("type", 0) not in (0, 3):
                time.sleep(0.1)

    def _hmp(self, command: str) -> None:
        out = subprocess.run(
            [
                "virsh",
                "qemu-monitor-command",
                self.name,
                "--hmp",
                f'qemu-io -d virtio-disk0/virtio-backend "{command}"',
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        if out.strip():
            raise RuntimeError(f"qemu-io {command}: {out.strip()}")

    def cleanup(self, keep: bool) -> None:
        if self.dom is not None:
            try:
                if self.dom.isActive():
                    self.dom.destroy()
                self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError as err:
                print(f"bench: removing VM {self.name}: {err}", file=sys.stderr)
        if not keep:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.conn.close()


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024**2
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, {platform.system()} {platform.release()}"


PAIRED = [
    ("backup full", "nbdcopy export -> sparse file"),
    ("backup full -z (lz4)", "backup full"),
    ("restore full", "qemu-img convert file -> qcow2"),
    ("restore lz4 full", "restore full"),
    ("verify lz4 full", "verify full"),
]


def table(bench: Bench) -> str:
    rows = [
        "| step | wall s | MiB/s | peak RSS MiB | ratio to limit | target |",
        "|---|---:|---:|---:|---|---|",
    ]
    for s in bench.steps:
        ratio = f"{s.ratio:.2f}x {s.limit}" if s.ratio is not None else ""
        rows.append(
            f"| {s.name} | {s.seconds:.2f} | {s.mib_s:.0f} | {s.peak_rss_mib:.0f} | "
            f"{ratio} | {s.target} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--disk-gib", type=int, default=4, help="disk size (at least 3); the data stays the same"
    )
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--repeat", type=int, default=3, help="runs per step; the fastest counts")
    parser.add_argument("--json", default="benchmarks/results.json", help="where the JSON goes")
    parser.add_argument("--workdir", type=Path, help="default /var/lib/libvirt/images/<vm>")
    parser.add_argument("--keep", action="store_true", help="keep the images and backups")
    parser.add_argument("--build-disk", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_disk:
        build_disk(Path(args.build_disk[0]), int(args.build_disk[1]), int(args.build_disk[2]))
        return 0
    if os.geteuid() != 0:
        print("bench: run as root (libvirt, qemu-nbd)", file=sys.stderr)
        return 1
    bench = Bench(args.disk_gib * GiB, args.seed, args.workdir, args.repeat)
    try:
        bench.run()
    finally:
        bench.cleanup(args.keep)
    print()
    print(f"machine: {machine()}")
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"disk: {args.disk_gib} GiB qcow2, seed {args.seed}; RSS floor {floor:.0f} MiB")
    print(table(bench))
    for what, ratio in bench.extra_ratios.items():
        print(f"{what}: {ratio:.2f}x")
    print("the same ratios run by run (both steps of a pair ran one after the other):")
    for name, limit in PAIRED:
        runs = zip(bench.by_name(name).runs, bench.by_name(limit).runs, strict=False)
        print(f"  {name} / {limit}: {', '.join(f'{a / b:.2f}x' for a, b in runs)}")
    print("each run, in seconds (the spread is the noise of this host):")
    for s in bench.steps:
        print(f"  {s.name}: {', '.join(f'{r:.2f}' for r in s.runs)}")
    print(f"CPU seconds of each run, the command's + QEMU's, and the CPU floor on {CORES} cores:")
    for s in bench.steps:
        if not any(s.qemu_cpu_runs):
            continue
        runs = zip(s.cpu_runs, s.qemu_cpu_runs, strict=True)
        cpu = ", ".join(f"{own:.2f}+{qemu:.2f}" for own, qemu in runs)
        paired = dict(PAIRED).get(s.name)
        versus = ""
        if paired is not None:
            limit_step = bench.by_name(paired)
            versus = f", {s.cpu_floor / limit_step.seconds:.2f}x the fastest {paired}"
            if any(limit_step.qemu_cpu_runs):
                versus += f" and {s.cpu_floor / limit_step.cpu_floor:.2f}x its floor"
        print(f"  {s.name}: {cpu}; floor {s.cpu_floor:.2f} s{versus}")
    for check, value in bench.checks.items():
        print(f"{check}: {value}")
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "disk_gib": args.disk_gib,
        "seed": args.seed,
        "floor_mib": round(floor),
        "steps": [{**asdict(s), "mib_s": round(s.mib_s, 1)} for s in bench.steps],
        "extra_ratios": {k: round(v, 3) for k, v in bench.extra_ratios.items()},
        "checks": bench.checks,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench: JSON written to {args.json}")
    ok = all(v for k, v in bench.checks.items() if "identical" in k)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
