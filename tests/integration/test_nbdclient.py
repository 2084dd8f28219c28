"""The NBD client against a real qemu-nbd."""

from __future__ import annotations

import socket
from pathlib import Path

from libvirtnbdbackup.adapters import qemu
from libvirtnbdbackup.adapters.nbdclient import SEND_BUFFER, NbdClient


def test_connections_carry_a_whole_write_request_per_send(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu.create_image(str(image), 1 << 20, "qcow2")
    with qemu.nbd_server(str(image), "qcow2") as address:
        client = NbdClient.connect(address, wait=10)
        try:
            fd = client._h.aio_get_fd()
            sock = socket.socket(fileno=fd)
            try:
                # Linux reports twice the size asked for (bookkeeping included).
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= SEND_BUFFER
            finally:
                sock.detach()
        finally:
            client.close()
