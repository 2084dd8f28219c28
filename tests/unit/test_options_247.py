"""Every option of virtnbdbackup 2.47's three commands is accepted by ours.

The lists are 2.47's ``--help`` (its option groups, in its order): an admin's
cron line or script written for 2.47 must parse here with the same meaning.
Each option is given alone, long and short form, with a value of its type,
and must land in the destination that carries its meaning.
"""

from __future__ import annotations

import argparse
import shlex

import pytest

from libvirtnbdbackup.cli import backup, restore
from libvirtnbdbackup.cli import map as map_cli

# (short, long, value or None for a flag, our destination)
BACKUP_247 = [
    ("-d", "--domain", "vm1", "domain"),
    ("-l", "--level", "inc", "level"),
    ("-t", "--type", "raw", "type"),
    ("-r", "--raw", None, "raw"),
    ("-o", "--output", "/backup/vm1", "output"),
    ("-C", "--checkpointdir", "/cpt", "checkpointdir"),
    (None, "--scratchdir", "/scratch", "scratchdir"),
    ("-S", "--start-domain", None, "start_domain"),
    ("-i", "--include", "vda", "include"),
    ("-x", "--exclude", "vdb", "exclude"),
    ("-f", "--socketfile", "/run/x.sock", "socketfile"),
    ("-n", "--noprogress", None, "noprogress"),
    ("-z", "--compress", "5", "compress"),
    ("-w", "--worker", "2", "worker"),
    ("-F", "--freeze-mountpoint", "/var/lib/mysql,/srv", "freeze_mountpoint"),
    ("-e", "--strict", None, "strict"),
    (None, "--no-sparse-detection", None, "no_sparse_detection"),
    ("-T", "--threshold", "4096", "threshold"),
    ("-U", "--uri", "qemu+ssh://root@hv1/system", "uri"),
    (None, "--user", "admin", "user"),
    (None, "--ssh-user", "root", "ssh_user"),
    (None, "--ssh-port", "2222", "ssh_port"),
    (None, "--password", "secret", "password"),
    ("-P", "--nbd-port", "10900", "nbd_port"),
    ("-I", "--nbd-ip", "192.0.2.1", "nbd_ip"),
    (None, "--tls", None, "tls"),
    (None, "--tls-cert", "/etc/pki/x", "tls_cert"),
    ("-L", "--syslog", None, "syslog"),
    (None, "--quiet", None, "quiet"),
    (None, "--nocolor", None, "nocolor"),
    ("-q", "--qemu", None, "qemu"),
    ("-s", "--startonly", None, "startonly"),
    ("-k", "--killonly", None, "killonly"),
    ("-p", "--printonly", None, "printonly"),
    ("-v", "--verbose", None, "verbose"),
]

RESTORE_247 = [
    ("-a", "--action", "verify", "action"),
    ("-i", "--input", "/backup/vm1", "input"),
    ("-o", "--output", "/restore", "output"),
    ("-u", "--until", "virtnbdbackup.2", "until"),
    ("-s", "--sequence", "vda.full.data,vda.inc.virtnbdbackup.1.data", "sequence"),
    ("-d", "--disk", "vda", "disk"),
    ("-n", "--noprogress", None, "noprogress"),
    ("-f", "--socketfile", "/run/r.sock", "socketfile"),
    ("-r", "--raw", None, "raw"),
    ("-c", "--adjust-config", None, "adjust_config"),
    ("-D", "--define", None, "define"),
    ("-C", "--config-file", "vm1.xml", "config_file"),
    ("-N", "--name", "vm1-restored", "name"),
    ("-B", "--buffsize", "65536", "buffsize"),
    ("-A", "--preallocate", None, "preallocate"),
    ("-U", "--uri", "qemu+ssh://root@hv1/system", "uri"),
    (None, "--user", "admin", "user"),
    (None, "--ssh-user", "root", "ssh_user"),
    (None, "--ssh-port", "2222", "ssh_port"),
    (None, "--password", "secret", "password"),
    ("-P", "--nbd-port", "10900", "nbd_port"),
    ("-I", "--nbd-ip", "192.0.2.1", "nbd_ip"),
    (None, "--tls", None, "tls"),
    (None, "--tls-cert", "/etc/pki/x", "tls_cert"),
    ("-L", "--logfile", "/tmp/x/restore.log", "logfile"),
    (None, "--nocolor", None, "nocolor"),
    ("-v", "--verbose", None, "verbose"),
]

MAP_247 = [
    ("-f", "--file", "/backup/vda.full.data", "file"),
    ("-b", "--blocksize", "4096", "blocksize"),
    ("-d", "--device", "/dev/nbd0", "device"),
    ("-e", "--export-name", "sda", "export_name"),
    ("-t", "--threads", "4", "threads"),
    ("-l", "--listen-address", "127.0.0.1", "listen_address"),
    ("-p", "--listen-port", "10810", "listen_port"),
    ("-n", "--noprogress", None, "noprogress"),
    ("-L", "--logfile", "/tmp/x/map.log", "logfile"),
    (None, "--nocolor", None, "nocolor"),
    ("-r", "--readonly", None, "readonly"),
    ("-H", "--hexdump", None, "hexdump"),
    ("-v", "--verbose", None, "verbose"),
]

# What each command needs besides the option under test.
REQUIRED = {
    "virtnbdbackup": {"--domain": "vm1", "--output": "/backup/vm1"},
    "virtnbdrestore": {"--input": "/backup/vm1", "--output": "/restore"},
    "virtnbdmap": {},
}

COMMANDS = [
    ("virtnbdbackup", backup.build_parser, BACKUP_247),
    ("virtnbdrestore", restore.build_parser, RESTORE_247),
    ("virtnbdmap", map_cli.build_parser, MAP_247),
]


def _cases() -> list[tuple[str, object, tuple[str | None, str, str | None, str], str]]:
    cases = []
    for prog, build, options in COMMANDS:
        for option in options:
            for flag in (option[0], option[1]):
                if flag is not None:
                    cases.append((prog, build, option, flag))
    return [pytest.param(*c, id=f"{c[0]} {c[3]}") for c in cases]  # type: ignore[misc]


def _expected(parser: argparse.ArgumentParser, dest: str, value: str | None) -> object:
    if value is None:
        return True
    action = next(a for a in parser._actions if a.dest == dest)
    typed = action.type(value) if callable(action.type) else value
    return [typed] if isinstance(action.default, list) else typed


@pytest.mark.parametrize(("prog", "build", "option", "flag"), _cases())
def test_each_247_option_parses_with_its_meaning(
    prog: str, build: object, option: tuple[str | None, str, str | None, str], flag: str
) -> None:
    _short, long, value, dest = option
    parser = build()  # type: ignore[operator]
    argv = [flag] + ([value] if value is not None else [])
    for required, default in REQUIRED[prog].items():
        if required != long:
            argv += [required, default]
    args = parser.parse_args(argv)
    assert getattr(args, dest) == _expected(parser, dest, value)


@pytest.mark.parametrize(("prog", "build", "options"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_short_and_long_forms_are_one_option(prog: str, build: object, options: list) -> None:
    parser = build()  # type: ignore[operator]
    by_flag = {flag: action for action in parser._actions for flag in action.option_strings}
    for short, long, _value, dest in options:
        assert long in by_flag, f"{prog} lacks {long}"
        assert by_flag[long].dest == dest
        if short is not None:
            assert by_flag[short] is by_flag[long], f"{prog}: {short} is not {long}"


@pytest.mark.parametrize(("prog", "build"), [(c[0], c[1]) for c in COMMANDS])
@pytest.mark.parametrize("flag", ["-h", "--help", "-V", "--version"])
def test_help_and_version_exit_0(prog: str, build: object, flag: str) -> None:
    with pytest.raises(SystemExit) as done:
        build().parse_args([flag])  # type: ignore[operator]
    assert done.value.code == 0


def test_an_admins_247_cron_line_parses() -> None:
    line = "virtnbdbackup -d db1 -l auto -F /var/lib/mysql --nocolor -L -o /backup/db1"
    args = backup.build_parser().parse_args(shlex.split(line)[1:])
    assert (args.domain, args.level, args.freeze_mountpoint, args.output) == (
        "db1",
        "auto",
        "/var/lib/mysql",
        "/backup/db1",
    )
    assert args.nocolor and args.syslog
