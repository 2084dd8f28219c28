"""Extents through ``nbdinfo --map`` (virtnbdbackup 2.x's ``-q/--qemu``).

The default reads block status over our own libnbd connection; ``-q`` asks
the external tool instead, which is a second opinion when an extent map
looks wrong.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from ..errors import NbdError
from .command import run_tool
from .nbdclient import Extent, NbdAddress


def nbdinfo_uri(address: NbdAddress, export: str) -> str:
    uri = address.uri(export)
    if address.tls_dir:
        uri += f"?tls-certificates={quote(address.tls_dir)}"
    return uri


def map_extents(address: NbdAddress, export: str, context: str) -> list[Extent]:
    """Block status of the whole export for ``context``, in order."""
    uri = nbdinfo_uri(address, export)
    out = run_tool(
        ["nbdinfo", "--json", f"--map={context}", uri],
        f"read the {context} map of {export} with nbdinfo",
        NbdError,
        "libnbd-bin",
    )
    try:
        entries = json.loads(out)
        extents = [Extent(int(e["offset"]), int(e["length"]), int(e["type"])) for e in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise NbdError(f"nbdinfo printed no extent map for {export} ({err})") from None
    pos = 0
    for ext in extents:
        if ext.offset != pos:
            raise NbdError(f"nbdinfo's map of {export} has a gap at offset {pos}")
        pos += ext.length
    return extents
