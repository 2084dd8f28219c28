"""Throw-away libvirt VMs with disks of known content, for the integration tests.

The VMs boot firmware only: no OS is needed to back up their disks, and
SeaBIOS never writes to them, so an image can be compared with its backup
while the VM runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# VNBT_LAB lets several checkouts run their suites side by side on one host.
_LAB = os.environ.get("VNBT_LAB", "")
LAB_DIR = Path("/var/lib/libvirt/images/virtnbdbackup-tests" + (f"-{_LAB}" if _LAB else ""))
NAME_PREFIX = f"vnbt{_LAB}-"
GUEST_CACHE_NAME = "guest-cache"

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

GiB = 1024**3
MiB = 1024**2


@dataclass
class DiskSpec:
    target: str
    size: int
    fmt: str = "qcow2"
    writes: list[str] = field(default_factory=list)  # qemu-io commands
    options: str = ""  # qemu-img create -o
    random_mib: int = 0  # leading MiB of incompressible data


@dataclass
class LabVM:
    name: str
    dom: libvirt.virDomain
    images: dict[str, Path]
    folder: Path

    def state(self) -> int:
        return int(self.dom.state()[0])

    def checkpoints(self) -> list[str]:
        return sorted(cp.getName() for cp in self.dom.listAllCheckpoints(0))

    def has_job(self) -> bool:
        stats = self.dom.jobStats(0)
        return stats.get("type", 0) not in (
            libvirt.VIR_DOMAIN_JOB_NONE,
            libvirt.VIR_DOMAIN_JOB_COMPLETED,
        )


def sh(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def run_tool(
    tool: str,
    *args: str | Path,
    cwd: Path | None = None,
    stdout: object = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one of our commands as a user would, capturing its output."""
    return subprocess.run(
        [str(BIN / tool), *[str(a) for a in args]],
        cwd=cwd,
        env=env,
        text=True,
        timeout=timeout,
        stdout=stdout if stdout is not None else subprocess.PIPE,  # type: ignore[arg-type]
        stderr=subprocess.PIPE,
    )


def start_tool(tool: str, *args: str | Path) -> subprocess.Popen[str]:
    """One of our commands in the background, without progress bars."""
    return subprocess.Popen(
        [str(BIN / tool), "-n", *[str(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_when(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> None:
    """Freeze ``proc`` (SIGSTOP) as soon as ``ready()`` holds (polled)."""
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"ended before it could be stopped: {proc.communicate()}")
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)


def exists(path: Path, min_size: int = 0) -> Callable[[], bool]:
    return lambda: path.exists() and path.stat().st_size >= min_size


def resume_to_end(proc: subprocess.Popen[str], expect: int = 0) -> str:
    """SIGCONT a frozen ``proc`` and let it finish; its stderr."""
    proc.send_signal(signal.SIGCONT)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == expect, err
    return err


@contextlib.contextmanager
def small_filesystem(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of ``mib`` MiB mounted at ``path``: a backup target that fills up."""
    path.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs", path)
    try:
        yield path
    finally:
        sh("umount", "-l", path)


def backup_ok(vm: LabVM, out: Path, level: str, *args: str) -> str:
    """A backup that must succeed; its log."""
    proc = run_tool("virtnbdbackup", "-d", vm.name, "-l", level, "-o", out, "-n", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def restore_image(out: Path, dest: Path, *args: str) -> Path:
    """A restore that must succeed; the (one) qcow2 image it made."""
    proc = run_tool("virtnbdrestore", "-i", out, "-o", dest, "-n", *args)
    assert proc.returncode == 0, proc.stderr
    # --sequence names the image after the disk (vda), with no suffix, as 2.x does.
    images = list(dest.glob("*.qcow2")) or [
        p for p in dest.iterdir() if p.is_file() and p.suffix not in (".xml", ".fd", ".log")
    ]
    assert len(images) == 1, images
    return images[0]


def ensure_libvirtd() -> libvirt.virConnect:
    sh(REPO / "scripts" / "start-libvirtd.sh")
    return libvirt.open("qemu:///system")


def kvm_usable() -> bool:
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return False
    return bool(st.st_mode & 0o060)  # the qemu user reaches it through group kvm


def remove_leftovers(conn: libvirt.virConnect) -> None:
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(NAME_PREFIX):
            destroy(dom)
    if LAB_DIR.exists():
        for entry in LAB_DIR.iterdir():
            if entry.name == GUEST_CACHE_NAME:
                continue  # the test guest, built once per machine
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


def destroy(dom: libvirt.virDomain) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )


def make_image(path: Path, spec: DiskSpec) -> None:
    if spec.random_mib:
        raw = path.with_suffix(".random")
        with open("/dev/urandom", "rb") as src, open(raw, "wb") as dst:
            for _ in range(spec.random_mib):
                dst.write(src.read(MiB))
        os.truncate(raw, spec.size)
        sh("qemu-img", "convert", "-f", "raw", "-O", spec.fmt, raw, path)
        raw.unlink()
    else:
        opts = ["-o", spec.options] if spec.options else []
        sh("qemu-img", "create", "-q", "-f", spec.fmt, *opts, path, str(spec.size))
    if spec.writes:
        args = []
        for command in spec.writes:
            args += ["-c", command]
        sh("qemu-io", "-f", spec.fmt, *args, path)


def domain_xml(
    name: str, images: dict[str, tuple[Path, str]], cdrom: bool, uefi: Path | None = None
) -> str:
    kind = "kvm" if kvm_usable() else "qemu"
    firmware = ""
    if uefi is not None:  # UEFI: a loader and a per-VM NVRAM file, both backed up
        firmware = (
            f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
            f"<nvram template='{OVMF_VARS}'>{uefi}</nvram>"
        )
    disks = "\n".join(
        f"""<disk type='file' device='disk'>
          <driver name='qemu' type='{fmt}' discard='unmap'/>
          <source file='{path}'/>
          <target dev='{target}' bus='virtio'/>
        </disk>"""
        for target, (path, fmt) in images.items()
    )
    if cdrom:
        disks += """
        <disk type='file' device='cdrom'>
          <driver name='qemu' type='raw'/>
          <target dev='sda' bus='sata'/>
          <readonly/>
        </disk>"""
    return f"""<domain type='{kind}'>
      <name>{name}</name>
      <memory unit='MiB'>128</memory>
      <vcpu>1</vcpu>
      <os><type arch='x86_64' machine='q35'>hvm</type>{firmware}</os>
      <features><acpi/></features>
      <devices>{disks}</devices>
    </domain>"""


def create_vm(
    conn: libvirt.virConnect,
    disks: list[DiskSpec],
    cdrom: bool = True,
    start: bool = True,
    uefi: bool = False,
) -> LabVM:
    name = f"{NAME_PREFIX}{uuid.uuid4().hex[:8]}"
    folder = LAB_DIR / name
    folder.mkdir(parents=True)
    os.chmod(LAB_DIR, 0o755)
    os.chmod(folder, 0o755)
    images: dict[str, tuple[Path, str]] = {}
    for spec in disks:
        path = folder / f"{name}-{spec.target}.{spec.fmt}"
        make_image(path, spec)
        images[spec.target] = (path, spec.fmt)
    nvram = folder / f"{name}_VARS.fd" if uefi else None
    dom = conn.defineXML(domain_xml(name, images, cdrom, nvram))
    if start:
        dom.create()
    return LabVM(name, dom, {t: p for t, (p, _f) in images.items()}, folder)


def remove_vm(vm: LabVM) -> None:
    destroy(vm.dom)
    shutil.rmtree(vm.folder, ignore_errors=True)


def hmp_io(vm: LabVM, target: str, command: str) -> None:
    """Run a qemu-io command on a running VM's disk, as a guest write would."""
    index = sorted(vm.images).index(target)
    out = sh(
        "virsh",
        "qemu-monitor-command",
        vm.name,
        "--hmp",
        f'qemu-io -d virtio-disk{index}/virtio-backend "{command}"',
    ).stdout
    if out.strip():
        raise RuntimeError(f"qemu-io {command!r} on {vm.name}: {out.strip()}")


@dataclass
class Mirror:
    """A copy of a VM disk that gets every write the VM's disk gets: what a
    restore must equal (the live image file lags behind QEMU's cache)."""

    vm: LabVM
    target: str
    path: Path

    @classmethod
    def of(cls, vm: LabVM, target: str, folder: Path) -> Mirror:
        """Of a VM not written to since it started (its image file is current)."""
        path = folder / f"mirror.{target}.qcow2"
        sh("qemu-img", "convert", "-U", "-O", "qcow2", vm.images[target], path)
        return cls(vm, target, path)

    def write(self, command: str) -> None:
        hmp_io(self.vm, self.target, command)
        sh("qemu-io", "-f", "qcow2", "-c", command, self.path)


def images_identical(a: Path, b: Path) -> bool:
    """qemu-img compare: same guest-visible content (formats may differ)."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"qemu-img compare failed: {proc.stderr}")
    return proc.returncode == 0
