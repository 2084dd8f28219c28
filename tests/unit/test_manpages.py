"""The pages in man/ are what the argument parsers produce today, and render cleanly."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from libvirtnbdbackup.cli import manpages
from libvirtnbdbackup.cli.manpages import MAN_DIR, REGENERATE, Command, read_project

PROJECT = read_project()
FIX = f"man/ is stale; regenerate it with {REGENERATE} and commit the result"


def test_every_console_script_has_a_command() -> None:
    names = {c.name for c in PROJECT.commands}
    assert {"virtnbdbackup", "virtnbdrestore"} <= names
    for command in PROJECT.commands:
        assert isinstance(manpages.build_parser(command), argparse.ArgumentParser)


def test_committed_pages_match_the_parsers(tmp_path: Path) -> None:
    written = manpages.generate(tmp_path, PROJECT)
    committed = sorted(p.name for p in MAN_DIR.glob("*.1"))
    assert committed == sorted(p.name for p in written), FIX
    for fresh in written:
        current = manpages.undated((MAN_DIR / fresh.name).read_text())
        assert current == manpages.undated(fresh.read_text()), f"{fresh.name}: {FIX}"
    assert manpages.stale_pages(MAN_DIR, PROJECT) == []


def test_a_changed_option_makes_the_pages_stale(tmp_path: Path) -> None:
    man = tmp_path / "man"
    shutil.copytree(MAN_DIR, man)
    page = man / "virtnbdbackup.1"
    page.write_text(page.read_text().replace("Domain to back up.", "Domain to save."))
    (man / "gone.1").write_text(".TH GONE 1\n")
    problems = manpages.stale_pages(man, PROJECT)
    assert len(problems) == 2
    assert "gone.1: no console script" in problems[0]
    assert "-Domain to save." in problems[1] and "+Domain to back up." in problems[1]


def test_only_the_date_changing_is_not_stale(tmp_path: Path) -> None:
    man = tmp_path / "man"
    shutil.copytree(MAN_DIR, man)
    page = man / "virtnbdrestore.1"
    first, _, rest = page.read_text().partition("\n")
    dated = first.split('"')
    dated[3] = "1999\\-01\\-01"
    page.write_text('"'.join(dated) + "\n" + rest)
    assert manpages.stale_pages(man, PROJECT) == []


def test_regenerating_an_unchanged_page_keeps_its_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # "today" is 1970-01-01
    for path in manpages.generate(tmp_path, PROJECT):
        assert path.read_text() == (MAN_DIR / path.name).read_text()
    fresh = manpages.render(PROJECT.commands[0], PROJECT, manpages.today())
    assert '"1970\\-01\\-01"' in fresh.partition("\n")[0]


def test_pages_do_not_depend_on_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {}
    for columns in ("30", "250"):
        monkeypatch.setenv("COLUMNS", columns)
        pages[columns] = [manpages.render(c, PROJECT, "") for c in PROJECT.commands]
    assert pages["30"] == pages["250"]


@pytest.mark.parametrize("command", PROJECT.commands, ids=lambda c: c.name)
def test_page_holds_every_option_and_section(command: Command) -> None:
    page = (MAN_DIR / command.page_name).read_text()
    for action in manpages.build_parser(command)._actions:
        if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        for option in action.option_strings:
            assert f"\\fB{manpages.escape(option)}\\fR" in page, option
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "EXAMPLES", "SEE ALSO"):
        assert f"\n.SH {section}\n" in page, section
    others = [c.name for c in PROJECT.commands if c != command]
    assert all(f".BR {name} (1)" in page for name in others)


@pytest.mark.parametrize("command", PROJECT.commands, ids=lambda c: c.name)
def test_page_renders_without_warnings(command: Command) -> None:
    groff = shutil.which("groff")
    assert groff, "groff is missing: scripts/setup.sh installs groff-base"
    page = MAN_DIR / command.page_name
    check = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True
    )
    assert check.returncode == 0 and check.stderr == "", check.stderr
    text = subprocess.run(
        [groff, "-man", "-Tutf8", "-P", "-cbou", str(page)],
        capture_output=True,
        text=True,
        check=True,
        env={"LC_ALL": "C.UTF-8"},
    ).stdout
    assert re.search(rf"\n +{command.name} +- +\S", text)  # the NAME line
    assert "EXIT STATUS" in text


def test_roff_escaping() -> None:
    assert manpages.escape("-o -") == "\\-o \\-"
    assert manpages.escape("a\\b") == "a\\eb"
    assert manpages.escape(".TH x\n'quote") == "\\&.TH x\n\\&'quote"


def test_examples_come_from_the_epilog() -> None:
    epilog = (
        "examples:\n  # back up everything:\n  tool -a\n  tool -b\n\n  # then more:\n  tool -c\n"
    )
    roff = manpages.examples(epilog)
    assert roff is not None
    assert roff.splitlines() == [
        "Back up everything:",
        ".PP",
        ".RS 4",
        ".EX",
        "tool \\-a",
        "tool \\-b",
        ".EE",
        ".RE",
        ".PP",
        "Then more:",
        ".PP",
        ".RS 4",
        ".EX",
        "tool \\-c",
        ".EE",
        ".RE",
    ]
    assert manpages.examples(None) is None
    # No heading: every line is kept.
    assert manpages.examples("tool -x\n") == ".RS 4\n.EX\ntool \\-x\n.EE\n.RE"


def test_check_mode_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert manpages.main(["--check"]) == 0
    assert capsys.readouterr().err == ""
    (tmp_path / "virtnbdbackup.1").write_text(".TH VIRTNBDBACKUP 1\n")
    assert manpages.main(["--check", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "virtnbdrestore.1: missing" in err
    assert f"regenerate them with {REGENERATE}" in err


def test_exit_status_names_the_commands_own_strict_option() -> None:
    parser = argparse.ArgumentParser()
    assert manpages.exit_status(parser)[2] == (
        "2",
        "An invalid command line, after the usage is printed.",
    )
    parser.add_argument("--strict", action="store_true")
    assert "and --strict was given" in manpages.exit_status(parser)[2][1]
    codes = [code for code, _text in manpages.exit_status(parser)]
    assert codes == ["0", "1", "2"]
