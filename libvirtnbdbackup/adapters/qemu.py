"""qemu-img and qemu-nbd."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import QemuToolError

log = logging.getLogger(__name__)


def run(cmd: list[str], what: str) -> str:
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise QemuToolError(f"{cmd[0]} is not installed (install qemu-utils)") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        raise QemuToolError(f"cannot {what}: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout


def image_info(path: str) -> dict[str, Any]:
    """``qemu-img info`` of an image that may be in use by a running VM."""
    out = run(
        ["qemu-img", "info", "--output", "json", "--force-share", path],
        f"read image information of {path}",
    )
    info: dict[str, Any] = json.loads(out)
    return info


def qcow2_create_options(info: dict[str, Any], data_file: str | None = None) -> list[str]:
    """qemu-img create ``-o`` options that recreate the source image's layout."""
    options = []
    specific = info.get("format-specific", {}).get("data", {})
    if info.get("format") == "qcow2":
        if "compat" in specific:
            options.append(f"compat={specific['compat']}")
        if info.get("cluster-size"):
            options.append(f"cluster_size={info['cluster-size']}")
        if "lazy-refcounts" in specific:
            options.append(f"lazy_refcounts={'on' if specific['lazy-refcounts'] else 'off'}")
        if "compression-type" in specific:
            options.append(f"compression_type={specific['compression-type']}")
        if data_file and specific.get("data-file"):
            options.append(f"data_file={data_file}")
            if "data-file-raw" in specific:
                options.append(f"data_file_raw={'on' if specific['data-file-raw'] else 'off'}")
    return options


def create_image(
    path: str, size: int, fmt: str = "qcow2", options: list[str] | None = None
) -> None:
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if options:
        cmd += ["-o", ",".join(options)]
    run([*cmd, path, str(size)], f"create image {path}")


def convert_raw(source: str, dest: str) -> None:
    """Copy a raw image, keeping it sparse."""
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "raw", source, dest], f"copy {source}")


def convert_compressed(source: str, dest: str, options: list[str]) -> None:
    """Copy a qcow2 image into a new one whose clusters are compressed."""
    cmd = ["qemu-img", "convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2"]
    if options:
        cmd += ["-o", ",".join(options)]
    run([*cmd, source, dest], f"compress {source}")


def image_bitmaps(info: dict[str, Any]) -> dict[str, list[str]]:
    """Persistent bitmaps of a qcow2 image (from ``image_info``) and their flags."""
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: list(b.get("flags", [])) for b in bitmaps}


@contextmanager
def nbd_server(
    image: str,
    fmt: str = "qcow2",
    *,
    readonly: bool = False,
    export: str = "",
    bitmap: str | None = None,
    socket_dir: str | None = None,
) -> Iterator[str]:
    """Serve ``image`` with qemu-nbd on a private unix socket; yield the socket.

    qemu-nbd ends when its one client disconnects; it is killed if it is
    still there when the block is left. ``bitmap`` exposes that persistent
    dirty bitmap as ``qemu:dirty-bitmap:NAME``.
    """
    workdir = tempfile.mkdtemp(prefix="virtnbdbackup.", dir=socket_dir)
    socket = os.path.join(workdir, "nbd.sock")
    cmd = ["qemu-nbd", "--socket", socket, "--format", fmt, "--export-name", export]
    if readonly:
        cmd += ["--read-only"]
    else:
        cmd += ["--cache", "writeback", "--discard", "unmap"]
    if bitmap:
        cmd += ["--bitmap", bitmap]
    cmd += ["--shared", "1", image]
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        os.rmdir(workdir)
        raise QemuToolError("qemu-nbd is not installed (install qemu-utils)") from None
    try:
        yield socket
    except BaseException:
        proc.kill()
        raise
    finally:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        if os.path.exists(socket):
            os.unlink(socket)
        os.rmdir(workdir)
        if proc.returncode not in (0, -9) and err.strip():
            log.warning("qemu-nbd for %s: %s", image, err.strip().splitlines()[-1])
