"""A real Linux guest for the tests: built by scripts/build-test-guest.sh,
booted from its kernel and initramfs, driven through qemu-guest-agent.

Its two data disks (vda, and vdb with discard='unmap') hold ext4, made on
the host, and are mounted on /mnt/vda and /mnt/vdb inside the guest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import libvirt_qemu

from .vmlab import GUEST_CACHE_NAME, LAB_DIR, NAME_PREFIX, REPO, LabVM, MiB, destroy, sh

GUEST_CACHE = LAB_DIR / GUEST_CACHE_NAME
BOOT_TIMEOUT = 300  # seconds; TCG boots it in 7 s on an idle host, 74 s seen under load


def build_guest() -> Path:
    """The folder holding vmlinuz and initrd.img (built once per machine)."""
    out = sh(REPO / "scripts" / "build-test-guest.sh", GUEST_CACHE).stdout
    return Path(out.strip().splitlines()[-1])


def guest_xml(name: str, boot: Path, disks: dict[str, Path], console: Path) -> str:
    # TCG: a kernel-booted guest hung under KVM once on this kind of host.
    disk_xml = "\n".join(
        f"""<disk type='file' device='disk'>
          <driver name='qemu' type='qcow2'{" discard='unmap'" if target == "vdb" else ""}/>
          <source file='{path}'/>
          <target dev='{target}' bus='virtio'/>
        </disk>"""
        for target, path in disks.items()
    )
    return f"""<domain type='qemu'>
      <name>{name}</name>
      <memory unit='MiB'>256</memory>
      <vcpu>1</vcpu>
      <os>
        <type arch='x86_64' machine='q35'>hvm</type>
        <kernel>{boot / "vmlinuz"}</kernel>
        <initrd>{boot / "initrd.img"}</initrd>
        <cmdline>console=ttyS0 quiet panic=-1</cmdline>
      </os>
      <features><acpi/></features>
      <on_reboot>destroy</on_reboot>
      <devices>
        {disk_xml}
        <serial type='file'><source path='{console}'/><target port='0'/></serial>
        <channel type='unix'>
          <target type='virtio' name='org.qemu.guest_agent.0'/>
        </channel>
      </devices>
    </domain>"""


class AgentError(RuntimeError):
    pass


@dataclass
class Guest:
    """A booted guest with its agent."""

    vm: LabVM
    console: Path

    @property
    def dom(self) -> libvirt.virDomain:
        return self.vm.dom

    def agent(self, command: str, timeout: int = 30, **arguments: object) -> object:
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(request), timeout, 0)
        except libvirt.libvirtError as err:
            raise AgentError(f"{command}: {err}") from None
        return json.loads(reply)["return"]

    def run(self, script: str, timeout: float = 60) -> str:
        """Run a shell script in the guest; its standard output. Fails loudly."""
        started = self.agent(
            "guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True}
        )
        pid = started["pid"]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.agent("guest-exec-status", pid=pid)
            if status["exited"]:  # type: ignore[index]
                out = base64.b64decode(status.get("out-data", "")).decode()  # type: ignore[union-attr]
                err = base64.b64decode(status.get("err-data", "")).decode()  # type: ignore[union-attr]
                if status.get("exitcode") != 0:  # type: ignore[union-attr]
                    raise AgentError(f"guest: {script!r} exited {status.get('exitcode')}: {err}")  # type: ignore[union-attr]
                return out
            time.sleep(0.1)
        raise AgentError(f"guest: {script!r} still running after {timeout} s")

    def write_file(self, path: str, seed: str, size: int) -> str:
        """A file of ``size`` bytes of content derived from ``seed``, synced;
        its SHA-256 as the guest computes it."""
        data = pattern(seed, size)
        # guest-file-* writes without a shell: content through the agent.
        handle = self.agent("guest-file-open", path=path, mode="w")
        for start in range(0, size, 48 * 1024):
            chunk = base64.b64encode(data[start : start + 48 * 1024]).decode()
            self.agent("guest-file-write", handle=handle, **{"buf-b64": chunk})
        self.agent("guest-file-close", handle=handle)
        self.run("sync")
        digest = self.run(f"sha256sum {path}").split()[0]
        assert digest == hashlib.sha256(data).hexdigest(), path
        return digest

    def sha256(self, paths: list[str]) -> dict[str, str]:
        out = self.run("sha256sum " + " ".join(paths))
        return {line.split()[1]: line.split()[0] for line in out.splitlines()}

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The guest's filesystems frozen (guest-fsfreeze-freeze): nothing
        changes on its disks until the block ends."""
        self.agent("guest-fsfreeze-freeze")
        try:
            yield
        finally:
            self.agent("guest-fsfreeze-thaw")

    def copy_images(self, dest: Path) -> dict[str, Path]:
        """Copies of the data disks as they are now (run it while frozen)."""
        dest.mkdir(parents=True, exist_ok=True)
        copies = {}
        for target, image in self.vm.images.items():
            copies[target] = dest / f"{target}.qcow2"
            sh("qemu-img", "convert", "-U", "-O", "qcow2", image, copies[target])
        return copies

    def freeze_status(self) -> str:
        return str(self.agent("guest-fsfreeze-status"))

    def ping(self) -> None:
        self.agent("guest-ping", timeout=5)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds until the agent answered and the data disks were mounted."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                self.ping()
                mounts = self.run("cat /proc/mounts")
                if "/mnt/vda" in mounts and "/mnt/vdb" in mounts:
                    return time.monotonic() - start
            except AgentError:
                pass
            time.sleep(0.5)
        log = self.console.read_text(errors="replace") if self.console.exists() else ""
        raise AgentError(f"guest {self.vm.name} not ready after {timeout} s; console:\n{log}")

    def shutdown(self) -> None:
        """Unmount the data disks cleanly, then power off (the initramfs has
        no init system for guest-shutdown to call: busybox powers off)."""
        self.run("sync; umount /mnt/vda; umount /mnt/vdb; sync")
        self.agent("guest-exec", path="/bin/busybox", arg=["poweroff", "-f"])
        deadline = time.monotonic() + 60
        while self.dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.dom.isActive():
            raise AgentError(f"guest {self.vm.name} did not power off")

    def start(self) -> float:
        self.dom.create()
        return self.wait_ready()


def pattern(seed: str, size: int) -> bytes:
    """Known, incompressible content: SHA-256 in counter mode."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def create_guest(conn: libvirt.virConnect, data_size: int = 64 * MiB) -> Guest:
    boot = build_guest()
    name = f"{NAME_PREFIX}guest-{uuid.uuid4().hex[:6]}"
    folder = LAB_DIR / name
    folder.mkdir(parents=True)
    LAB_DIR.chmod(0o755)
    folder.chmod(0o755)
    disks = {}
    for target in ("vda", "vdb"):
        # mkfs under TCG takes seconds; on the host, no time. No lazy init: a
        # kernel thread writing inode tables after the mount would change the
        # disk behind the tests' backs.
        raw = folder / f"{name}-{target}.raw"
        os.truncate(raw, data_size) if raw.exists() else raw.write_bytes(b"")
        os.truncate(raw, data_size)
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", raw)
        path = folder / f"{name}-{target}.qcow2"
        sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path)
        raw.unlink()
        disks[target] = path
    console = folder / "console.log"
    dom = conn.defineXML(guest_xml(name, boot, disks, console))
    guest = Guest(LabVM(name, dom, disks, folder), console)
    return guest


def debugfs_read(image: Path, paths: list[str], scratch: Path) -> dict[str, str | None]:
    """SHA-256 of each file in the ext4 filesystem of a qcow2 image, read
    without mounting (debugfs on a raw copy); None for a missing file."""
    raw = scratch / f"{image.name}.raw"
    sh("qemu-img", "convert", "-U", "-O", "raw", image, raw)
    try:
        result: dict[str, str | None] = {}
        for path in paths:
            proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True)
            stat = subprocess.run(
                ["debugfs", "-R", f"stat {path}", str(raw)], capture_output=True, text=True
            )
            if "File not found" in stat.stderr or proc.returncode != 0:
                result[path] = None
            else:
                result[path] = hashlib.sha256(proc.stdout).hexdigest()
        return result
    finally:
        raw.unlink()


def remove_guest(guest: Guest) -> None:
    destroy(guest.dom)
    shutil.rmtree(guest.vm.folder, ignore_errors=True)


def write_offline(image: Path, name: str, data: bytes, scratch: Path) -> None:
    """Add a file to the ext4 of a shut-off domain's qcow2 image: qemu-nbd
    serves it (keeping its persistent bitmaps up to date, as QEMU would),
    nbdfuse makes that a raw file, debugfs writes into it."""
    source = scratch / f"offline-{uuid.uuid4().hex[:6]}"
    source.write_bytes(data)
    mnt = scratch / f"fuse-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    pidfile = scratch / f"{mnt.name}.pid"
    proc = subprocess.Popen(
        ["nbdfuse", "-P", str(pidfile), str(mnt), "--socket-activation",
         "qemu-nbd", "-f", "qcow2", str(image)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdfuse did not start: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.1)
        sh("debugfs", "-w", "-R", f"write {source} {name}", mnt / "nbd")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=30)
        source.unlink()
