"""venv/create.sh builds a working venv from any folder, and says what is missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from libvirtnbdbackup.cli.manpages import read_project

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "venv" / "create.sh"
COMMANDS = [c.name for c in read_project().commands]


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_help(tmp_path: Path) -> None:
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: venv/create.sh [--dev] [VENV_DIR]")
    assert run("--no-such-option", cwd=tmp_path).returncode == 2


def test_missing_bindings_are_named(tmp_path: Path) -> None:
    # python3 -S leaves out the distribution's site-packages, as if
    # python3-libvirt and python3-libnbd were not installed.
    bare = tmp_path / "python3"
    bare.write_text('#!/bin/sh\nexec /usr/bin/python3 -S "$@"\n')
    bare.chmod(0o755)
    result = run(
        str(tmp_path / "env"),
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "VENV_PYTHON": str(bare)},
    )
    assert result.returncode == 1
    assert "python3-libvirt" in result.stderr
    assert "python3-libnbd" in result.stderr
    assert not (tmp_path / "env").exists()


def test_refuses_a_folder_that_is_not_a_venv(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    result = run(str(tmp_path / "data"), cwd=tmp_path)
    assert result.returncode == 1
    assert "is not a venv" in result.stderr


def test_builds_a_working_venv_and_runs_again(tmp_path: Path) -> None:
    """About 15 s: a venv, and a wheel of the package built offline."""
    target = tmp_path / "env"
    units = tmp_path / "units"
    env = {**os.environ, "SYSTEMD_UNIT_DIR": str(units)}  # as where systemd runs
    for _ in range(2):  # the second run reuses the venv and reinstalls
        result = run(str(target), cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == f"venv: ready at {target}"
    service = (units / "virtnbdfleet.service").read_text()
    assert f"ExecStart={target}/bin/virtnbdfleet backup -c /etc/virtnbdfleet.toml" in service
    assert "@BINDIR@" not in service and "KillMode=mixed" in service
    assert "OnCalendar=" in (units / "virtnbdfleet.timer").read_text()
    (units / "virtnbdfleet.timer").write_text("[Timer]\nOnCalendar=hourly\n")  # the admin's own
    result = run(str(target), cwd=tmp_path, env=env)
    assert result.returncode == 0 and "written by someone else: left alone" in result.stderr
    assert (units / "virtnbdfleet.timer").read_text() == "[Timer]\nOnCalendar=hourly\n"
    for command in COMMANDS:
        help_run = subprocess.run(
            [str(target / "bin" / command), "--help"], capture_output=True, text=True
        )
        assert help_run.returncode == 0, help_run.stderr
        assert help_run.stdout.startswith(f"usage: {command} ")
        assert (target / "share" / "man" / "man1" / f"{command}.1").is_file()
    # The commands come from the venv, not from this checkout.
    location = subprocess.run(
        [
            str(target / "bin" / "python"),
            "-c",
            "import libvirtnbdbackup; print(libvirtnbdbackup.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert location.startswith(str(target))
