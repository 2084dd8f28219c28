"""virtnbdmap's option checks, listen addresses and nbdkit command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirtnbdbackup.adapters import blockdev
from libvirtnbdbackup.adapters.nbdkit import PLUGIN, Endpoint, NbdkitServer
from libvirtnbdbackup.cli import map as map_cli
from libvirtnbdbackup.errors import NbdError


@pytest.mark.parametrize(
    ("text", "uri"),
    [
        ("unix:/run/vda.sock", "nbd+unix:///vda?socket=/run/vda.sock"),
        ("127.0.0.1:10809", "nbd://127.0.0.1:10809/vda"),
        ("[::1]:10810", "nbd://[::1]:10810/vda"),
        ("backup-host:1234", "nbd://backup-host:1234/vda"),
    ],
)
def test_listen_addresses(text: str, uri: str) -> None:
    assert Endpoint.parse(text).uri("vda") == uri


@pytest.mark.parametrize(
    "text", ["unix:", "10809", "host:", "host:port", "unix:/" + "x" * 120]
)
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


def test_nbdkit_takes_writes_in_the_cow_filter_unless_readonly(tmp_path: Path) -> None:
    def command(readonly: bool) -> list[str]:
        server = NbdkitServer(
            ["/b/vda.full.data", "/b/vda.inc.virtnbdbackup.1.data"],
            "vda",
            Endpoint(socket="/run/x.sock"),
            readonly=readonly,
            threads=4,
            workdir=tmp_path,
        )
        return server.command()

    writable = command(False)
    assert "--filter=cow" in writable and "--readonly" not in writable
    assert "--exit-with-parent" in writable
    assert writable[writable.index("python") + 1] == PLUGIN
    assert writable[-2:] == ["file=/b/vda.full.data", "file=/b/vda.inc.virtnbdbackup.1.data"]
    readonly = command(True)
    assert "--readonly" in readonly and "--filter=cow" not in readonly
    assert Path(PLUGIN).is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the data files with -f"),
        (["-i", "/b", "--listen", "unix:/x", "--boot"], "--listen serves only"),
        (["-i", "/b", "--boot", "-d", "loop"], "--boot needs no block device"),
    ],
)
def test_option_conflicts(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        map_cli.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_two_x_option_names_are_kept() -> None:
    parser = map_cli.build_parser()
    options = {o for action in parser._actions for o in action.option_strings}
    for name in [
        "-f",
        "--file",
        "-d",
        "--device",
        "-e",
        "--export-name",
        "-t",
        "--threads",
        "-l",
        "--listen-address",
        "-p",
        "--listen-port",
        "-r",
        "--readonly",
        "-n",
        "--noprogress",
        "-v",
        "--verbose",
        "-V",
        "--version",
    ]:
        assert name in options


def test_kernel_nbd_device_attaches_and_detaches_with_qemu_nbd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host has no nbd module: the commands are checked, not run."""
    device = tmp_path / "nbd3"
    device.touch()
    ran: list[list[str]] = []
    monkeypatch.setattr(blockdev, "_run", lambda cmd, what: ran.append(cmd) or "")
    nbd = blockdev.KernelNbdDevice(str(device), "nbd+unix:///vda?socket=/s", readonly=True)
    nbd.start()
    nbd.stop()
    nbd.stop()  # a second stop does nothing
    assert ran[0] == [
        "qemu-nbd",
        "--connect",
        str(device),
        "--format",
        "raw",
        "--read-only",
        "nbd+unix:///vda?socket=/s",
    ]
    assert ran[-1] == ["qemu-nbd", "--disconnect", str(device)]
    assert len([c for c in ran if c[0] == "qemu-nbd"]) == 2


def test_missing_nbd_device_is_reported() -> None:
    nbd = blockdev.KernelNbdDevice("/dev/nbd-none", "nbd+unix:///vda?socket=/s", readonly=False)
    with pytest.raises(NbdError, match="does not exist"):
        nbd.start()


def test_a_port_alone_listens_on_loopback() -> None:
    assert Endpoint.parse(":10809").uri("vda") == "nbd://127.0.0.1:10809/vda"
