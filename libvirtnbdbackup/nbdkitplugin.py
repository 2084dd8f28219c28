"""nbdkit python plugin: serve the disk that a chain of data files restores to.

nbdkit loads this file by path::

    nbdkit python /path/to/libvirtnbdbackup/nbdkitplugin.py \\
        file=vda.full.data file=vda.inc.virtnbdbackup.1.data export=vda

``file`` is repeated in chain order (full or copy first). ``export`` names
the one export offered (any name is accepted when it is left out).
``cache`` bounds the decompressed LZ4 pieces kept in memory (e.g. 256M).
``hexdump`` names a file that gets one line per read: offset, length and
the first bytes in hex (virtnbdmap -H, for debugging).
The export is read-only: put nbdkit's cow filter in front to take writes.
"""

from __future__ import annotations

import builtins
import errno
import os
import sys
import threading

# nbdkit runs the system Python: make this package importable from its checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# zlib-ng from virtnbdmap's venv (adapters/nbdkit.py), for a Python of the same
# version only, and after the system's packages, which come first.
_version, _, _site = os.environ.get("VIRTNBDBACKUP_SITE", "").partition(":")
if _site and _version == f"{sys.version_info.major}.{sys.version_info.minor}":
    sys.path.append(_site)

import nbdkit  # noqa: E402

from libvirtnbdbackup.format.chainimage import DEFAULT_CACHE, ChainImage  # noqa: E402

API_VERSION = 2

_files: list[str] = []
_export: str | None = None
_cache = DEFAULT_CACHE
_image: ChainImage | None = None
_hexdump: str | None = None
_hexdump_lock = threading.Lock()
HEXDUMP_BYTES = 32


def config(key: str, value: str) -> None:
    global _export, _cache, _hexdump
    if key == "hexdump":
        _hexdump = os.path.abspath(value)
    elif key == "file":
        _files.append(os.path.abspath(value))
    elif key == "export":
        _export = value
    elif key == "cache":
        _cache = nbdkit.parse_size(value)
    else:
        raise RuntimeError(f"unknown parameter {key!r} (expected file=, export=, cache=, hexdump=)")


def config_complete() -> None:
    if not _files:
        raise RuntimeError("give the data files of the chain with file=PATH, oldest first")


def get_ready() -> None:
    """Open the chain once, before the first client connects: errors stop nbdkit."""
    global _image
    _image = ChainImage(_files, _cache)
    nbdkit.debug(f"serving {len(_files)} data file(s), {len(_image.segments)} segments")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    return [(_export or "", f"backup chain of {len(_files)} file(s)")]


def default_export(readonly: bool, is_tls: bool) -> str:
    return _export or ""


def open(readonly: bool) -> ChainImage:
    name = nbdkit.export_name()
    if _export is not None and name not in ("", _export):
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no export {name!r}; this server offers {_export!r}")
    assert _image is not None
    return _image


def get_size(h: ChainImage) -> int:
    return h.size


def can_write(h: ChainImage) -> bool:
    return False


def can_multi_conn(h: ChainImage) -> bool:
    return True


def can_extents(h: ChainImage) -> bool:
    return True


def can_cache(h: ChainImage) -> int:
    return int(nbdkit.CACHE_EMULATE)


def is_rotational(h: ChainImage) -> bool:
    return False


def pread(h: ChainImage, buf: memoryview, offset: int, flags: int) -> None:
    h.read_into(memoryview(buf), offset)
    if _hexdump is not None:
        head = bytes(memoryview(buf)[:HEXDUMP_BYTES]).hex(" ")
        with _hexdump_lock, builtins.open(_hexdump, "a") as fh:
            fh.write(f"read {offset:#x} +{len(buf)}: {head}\n")


# Clients ask for the status of the whole rest of the disk and use the first
# runs; a fragmented chain has many thousands, so answer with a bounded part
# (NBD lets the server cover less than asked; the client asks again).
EXTENTS_PER_REPLY = 256


def extents(h: ChainImage, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    zero = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    limit = 1 if flags & nbdkit.FLAG_REQ_ONE else EXTENTS_PER_REPLY
    runs = h.extents(offset, count, limit)
    return [(start, length, zero if z else 0) for start, length, z in runs]
