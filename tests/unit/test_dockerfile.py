"""docker/Dockerfile cannot be built here (no container engine): lint it and
check that it cannot drift from the repository it is built from."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from libvirtnbdbackup.cli.manpages import read_project

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SETUP = REPO / "scripts" / "setup.sh"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def bash_array(script: Path, name: str) -> list[str]:
    """The elements of a bash array assigned in ``script``, as bash sees them."""
    block = re.search(rf"^{name}=\(.*?^\)", script.read_text(), re.MULTILINE | re.DOTALL)
    assert block, f"{script} assigns no {name}=( ... )"
    out = subprocess.run(
        ["bash", "-c", f'{block[0]}\nprintf "%s\\n" "${{{name}[@]}}"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


STEPS = instructions(DOCKERFILE.read_text())


def test_based_on_debian_12() -> None:
    assert STEPS[0][0] == "FROM"
    assert re.fullmatch(r"debian:(12|bookworm)(-slim)?", STEPS[0][1])


def test_copies_only_files_of_the_repository() -> None:
    copies = [shlex.split(args) for keyword, args in STEPS if keyword in ("COPY", "ADD")]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert not source.startswith("--"), f"COPY {source}: no flags expected"
            assert (REPO / source).exists(), f"docker/Dockerfile copies {source}, which is missing"


def test_installs_the_runtime_packages_of_setup_sh() -> None:
    runs = " ".join(args for keyword, args in STEPS if keyword == "RUN")
    installs = re.findall(r"apt-get install ([^&;|]+)", runs)
    assert len(installs) == 1
    packages = [word for word in installs[0].split() if not word.startswith("-")]
    expected = bash_array(SETUP, "RUNTIME_PACKAGES")
    assert sorted(packages) == sorted(expected), (
        "docker/Dockerfile must install exactly RUNTIME_PACKAGES of scripts/setup.sh"
    )
    assert '"${RUNTIME_PACKAGES[@]}"' in SETUP.read_text(), "setup.sh installs them too"


def test_builds_the_venv_with_the_copied_script() -> None:
    runs = [args for keyword, args in STEPS if keyword == "RUN"]
    assert any(args.split()[0] == "venv/create.sh" for args in runs)
    copied = {shlex.split(args)[0] for keyword, args in STEPS if keyword == "COPY"}
    assert "venv/create.sh" in copied
    env = [args for keyword, args in STEPS if keyword == "ENV"]
    venv_dir = next(args.split()[1] for args in runs if args.startswith("venv/create.sh"))
    assert any(f"PATH={venv_dir}/bin:" in args for args in env)


def test_default_command_is_a_console_script() -> None:
    cmd = [args for keyword, args in STEPS if keyword == "CMD"]
    assert len(cmd) == 1
    command = json.loads(cmd[0])
    assert command[0] in {c.name for c in read_project().commands}


def test_hadolint_finds_nothing() -> None:
    beside = Path(sys.executable).parent / "hadolint"  # the venv is not always on PATH
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: scripts/setup.sh installs it with the dev extras")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_instruction_parser() -> None:
    text = 'FROM x\n# note\nRUN a \\\n    && b\nCMD ["c"]\n'
    assert instructions(text) == [("FROM", "x"), ("RUN", "a      && b"), ("CMD", '["c"]')]
