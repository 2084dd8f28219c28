"""virtnbdfleet without VMs: selectors, periods, durations, the TOML
configuration, port leases, the ledger and the retry set."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime
from pathlib import Path

import pytest

from libvirtnbdbackup.adapters.virt import DomainSummary, fleet_tags
from libvirtnbdbackup.cli.common import PASSWORD_ENV as COMMON_PASSWORD_ENV
from libvirtnbdbackup.cli.fleet import build_parser, exit_code, fleet_config, redacted
from libvirtnbdbackup.cli.prune import build_parser as prune_parser
from libvirtnbdbackup.errors import FolderLocked, TargetError, UsageError
from libvirtnbdbackup.jobs.fleet import (
    PASSWORD_ENV,
    FleetRun,
    Outcome,
    backup_command,
    child_env,
    job_folder,
    plan_jobs,
    retry_set,
)
from libvirtnbdbackup.jobs.fleetconfig import (
    FleetConfig,
    HypervisorConfig,
    Retention,
    VmSettings,
    load_config,
    parse_duration,
    period_name,
)
from libvirtnbdbackup.jobs.fleetselect import Selection, parse_selector, parse_selectors
from libvirtnbdbackup.jobs.fleetstatus import fleet_status
from libvirtnbdbackup.targets.fleetledger import SCHEMA, Ledger
from libvirtnbdbackup.targets.fleetlocks import PortPool, lock_vm_folder


def test_selector_kinds() -> None:
    assert parse_selector("web1").kind == "name"
    assert parse_selector("web*").kind == "glob"
    assert parse_selector("re:^db[0-9]+$").kind == "regex"
    assert parse_selector("tag:nightly").kind == "tag"
    assert parse_selector("name:odd*name").kind == "name"
    assert parse_selector("web1").matches("web1") and not parse_selector("web1").matches("web10")
    assert parse_selector("web?").matches("web2") and not parse_selector("web?").matches("web22")
    assert parse_selector("re:^db[0-9]+$").matches("db12")
    assert not parse_selector("re:^db[0-9]+$").matches("db1x")
    assert parse_selector("re:mail").matches("old-mail-2"), "a regex is searched"
    assert parse_selector("tag:nightly").matches("anything", ("weekly", "nightly"))
    assert not parse_selector("tag:nightly").matches("nightly", ())
    assert parse_selector("name:odd*name").matches("odd*name")
    for bad in ("re:([", "tag:", ""):
        with pytest.raises(UsageError):
            parse_selector(bad)


def test_selection_excludes_win_and_all() -> None:
    sel = Selection(parse_selectors(["web*", "tag:db"]), parse_selectors(["web-test"]))
    assert sel.chooses("web1") and sel.chooses("x", ("db",))
    assert not sel.chooses("web-test") and not sel.chooses("mail")
    everything = Selection(select_all=True, exclude=parse_selectors(["re:^tmp"]))
    assert everything.chooses("mail") and not everything.chooses("tmp1")
    assert Selection().is_empty and not everything.is_empty
    assert (Selection() + everything).select_all
    assert sel.unmatched_names(["web1"]) == []
    assert Selection(parse_selectors(["web1", "db1"])).unmatched_names(["web1"]) == ["db1"]


def test_fleet_tags_from_the_metadata_element() -> None:
    xml = """<domain><name>a</name><metadata>
      <other xmlns="urn:x"><tag>no</tag></other>
      <f:fleet xmlns:f="urn:virtnbdbackup:fleet"><f:tag>nightly</f:tag><f:tag> mx </f:tag>
      <f:tag>nightly</f:tag></f:fleet></metadata></domain>"""
    assert fleet_tags(xml) == ("nightly", "mx")
    assert fleet_tags("<domain><name>a</name></domain>") == ()


def test_durations() -> None:
    assert parse_duration("26h") == 26 * 3600
    assert parse_duration("90m") == 5400
    assert parse_duration("2d12h") == 2.5 * 86400
    assert parse_duration("1w") == 7 * 86400
    assert parse_duration("45") == 45
    for bad in ("", "h", "2x", "1h 2m", "-1h"):
        with pytest.raises(UsageError):
            parse_duration(bad)


def test_periods() -> None:
    when = datetime(2026, 12, 31, 23, 59)
    assert period_name("monthly", when) == "2026-12"
    assert period_name("daily", when) == "2026-12-31"
    assert period_name("yearly", when) == "2026"
    assert period_name("weekly", when) == "2026-W53"
    assert period_name("weekly", datetime(2027, 1, 4)) == "2027-W01"
    assert period_name("monthly", datetime(2027, 1, 1, 0, 0)) == "2027-01"


def test_job_folder_levels(tmp_path: Path) -> None:
    now = datetime(2026, 11, 5, 10, 0, 0)
    vm = tmp_path / "host" / "vm"
    assert job_folder(vm, VmSettings(), now) == (vm / "2026-11", "2026-11", "full")
    (vm / "2026-11").mkdir(parents=True)
    (vm / "2026-11" / "vm.cpt").write_text("[]")
    assert job_folder(vm, VmSettings(), now)[2] == "inc"
    assert job_folder(vm, VmSettings(level="diff"), now)[2] == "diff"
    assert job_folder(vm, VmSettings(period="daily"), now)[1:] == ("2026-11-05", "full")
    assert job_folder(vm, VmSettings(level="copy"), now) == (
        vm / "2026-11-05T100000",
        "2026-11-05T100000",
        "copy",
    )


CONFIG = """
output = "/backup"
jobs = 4
host_jobs = 2
period = "weekly"
compress = 2
select = ["web*", "tag:nightly"]
exclude = ["*-test"]

[retention]
keep_last = 3

[vm.web1]
level = "diff"
exclude_disks = ["vdb"]

[[hypervisor]]
uri = "qemu:///system"

[[hypervisor]]
uri = "qemu+ssh://root@hv1/system"
host_jobs = 1
nbd_port = 11000
nbd_ports = 8
tls = true
ssh_private_key = "/root/.ssh/hv1"
select = ["re:^db"]

[hypervisor.vm.web1]
compress = false
period = "daily"
"""


def test_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(CONFIG)
    config = load_config(path)
    assert config.output == Path("/backup") and config.jobs == 4
    local, hv1 = config.hypervisors
    assert (local.name, hv1.name) == ("localhost", "hv1")
    assert not local.is_remote and hv1.is_remote
    assert hv1.remote.nbd_port == 11000 and hv1.nbd_ports == 8 and hv1.remote.tls
    assert hv1.remote.ssh_key == "/root/.ssh/hv1"
    assert config.host_limit(local) == 2 and config.host_limit(hv1) == 1
    assert config.selection_for(hv1).chooses("db7")
    assert not config.selection_for(local).chooses("db7")
    assert not config.selection_for(hv1).chooses("web-test")
    # Defaults, then [vm.NAME], then [hypervisor.vm.NAME].
    assert config.settings_for(local, "web1") == VmSettings(
        level="diff", period="weekly", compress=2, exclude_disks=("vdb",)
    )
    assert config.settings_for(hv1, "web1") == VmSettings(
        level="diff", period="daily", compress=None, exclude_disks=("vdb",)
    )
    assert config.settings_for(hv1, "other") == VmSettings(period="weekly", compress=2)
    assert config.retention == Retention((("keep_last", 3),))
    assert config.retention.prune_args() == ["--keep-last", "3"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("jobs = 0", "jobs must be from 1"),
        ("jobz = 2", "unknown setting(s) jobz"),
        ('level = "weekly"', "level 'weekly': choose one of"),
        ("compress = 17", "compress must be from 0 to 16"),
        ('select = "web*"', "select must be a list of strings"),
        ("[[hypervisor]]\nname = 'x'", "uri is missing"),
        ("[[hypervisor]]\nuri = 'qemu:///system'\nname = '../x'", "cannot be a folder name"),
        (
            "[[hypervisor]]\nuri = 'qemu:///system'\n[[hypervisor]]\nuri = 'qemu:///session'",
            "would share the folder localhost",
        ),
        ("[vm.a]\nfreez = ['/']", "vm.a: unknown setting(s) freez"),
        ("jobs = ", "is not valid TOML"),
        ("[retention]\nverify = true", "no keep rule"),
        ("[retention]\nkeep_hourly = 2", "unknown setting(s) keep_hourly"),
        ("[retention]\nkeep_within = '2x'", "duration '2x' is not understood"),
        ("[[hypervisor]]\nuri = 'qemu:///system'\npassword_file = '/nonexistent/pw'",
         "password_file /nonexistent/pw"),
    ],
)
def test_configuration_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_command_line_adds_to_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(CONFIG)
    args = build_parser().parse_args(
        ["backup", "-c", str(path), "-o", str(tmp_path), "-U", "qemu+ssh://hv2/system",
         "-P", "12000", "--select", "mail", "--jobs", "8", "-l", "auto", "--period", "monthly"]
    )  # fmt: skip
    config = fleet_config(args)
    assert config.output == tmp_path and config.jobs == 8
    assert [h.name for h in config.hypervisors] == ["localhost", "hv1", "hv2"]
    assert config.hypervisors[2].remote.nbd_port == 12000
    assert config.selection_for(config.hypervisors[0]).chooses("mail")
    assert config.settings_for(config.hypervisors[0], "web1").level == "diff"  # [vm.web1] wins
    assert config.defaults.period == "monthly"
    bare = build_parser().parse_args(["backup", "-o", str(tmp_path)])
    with pytest.raises(UsageError, match="nothing is selected"):
        fleet_config(bare)
    everything = fleet_config(build_parser().parse_args(["backup", "-o", str(tmp_path), "--all"]))
    assert [h.uri for h in everything.hypervisors] == ["qemu:///system"]


@pytest.mark.parametrize(
    ("setting", "option", "over_ssh"),
    [
        ("", [], True),
        ("nbd_port = 11000", ["-P", "11000"], False),
        ("nbd_ip = '192.0.2.1'", ["-I", "192.0.2.1"], False),
        ("tls = true", ["--tls"], False),
    ],
)
def test_remote_jobs_go_over_ssh_unless_tcp_is_asked_for(
    tmp_path: Path, setting: str, option: list[str], over_ssh: bool
) -> None:
    """The secure default of the single-VM command holds in the fleet: no port is
    given to a remote job, so its NBD runs over its SSH connection."""
    path = tmp_path / "fleet.toml"
    path.write_text(f"[[hypervisor]]\nuri = 'qemu+ssh://hv1/system'\n{setting}\n")
    from_file = load_config(path).hypervisors[0]
    args = build_parser().parse_args(
        ["backup", "-o", str(tmp_path), "-U", "qemu+ssh://hv1/system", "--all", *option]
    )
    from_options = fleet_config(args).hypervisors[0]
    for host in (from_file, from_options):
        assert host.remote.over_ssh is over_ssh
        config = FleetConfig(output=tmp_path, hypervisors=[host])
        run = FleetRun(config, Ledger(tmp_path), 1, threading.Event(), port_lock_dir=tmp_path)
        assert (host.name in run.pools) is not over_ssh  # ports are leased for TCP only


def summary(name: str, disks: int = 1, tags: tuple[str, ...] = ()) -> DomainSummary:
    return DomainSummary(name, f"uuid-{name}", True, disks, tags)


def test_plan_selects_per_hypervisor_interleaves_and_reports_unreachable(tmp_path: Path) -> None:
    a = HypervisorConfig("qemu:///system", "a", selection=Selection(parse_selectors(["web*"])))
    b = HypervisorConfig("qemu+ssh://b/system", "b", selection=Selection(select_all=True))
    c = HypervisorConfig("qemu+ssh://c/system", "c", selection=Selection(select_all=True))
    config = FleetConfig(output=tmp_path, hypervisors=[a, b, c])
    domains = {
        "a": [summary("web1"), summary("web2"), summary("db1")],
        "b": [summary("x1"), summary("x2", disks=3)],
    }

    def listing(host: HypervisorConfig) -> list[DomainSummary]:
        if host.name == "c":
            raise UsageError("cannot connect to c")
        return domains[host.name]

    plan = plan_jobs(config, datetime(2026, 11, 5), connect=listing)
    assert [j.label for j in plan.jobs] == ["a/web1", "b/x1", "a/web2", "b/x2"]
    assert plan.jobs[3].ports_needed == 3
    assert plan.jobs[0].folder == tmp_path / "a" / "web1" / "2026-11"
    assert [(f.host.name, f.message) for f in plan.failures] == [("c", "cannot connect to c")]
    retried = plan_jobs(config, datetime(2026, 11, 5), retry={("b", "x2")}, connect=listing)
    assert [j.label for j in retried.jobs] == ["b/x2"]
    odd = {"a": [summary("web.ok"), summary(".web"), summary("web/x"), summary("Web Server 1")]}
    named = plan_jobs(
        FleetConfig(
            output=tmp_path, hypervisors=[HypervisorConfig("qemu:///system", "a",
            selection=Selection(parse_selectors(["re:(?i)web"])))]
        ),
        datetime(2026, 11, 5),
        connect=lambda h: odd[h.name],
    )  # fmt: skip
    assert [j.vm.name for j in named.jobs] == ["web.ok", "Web Server 1"]
    assert [(f.vm.name, "cannot be a folder name" in f.message) for f in named.vm_failures] == [
        (".web", True),
        ("web/x", True),
    ]


def test_port_leases_never_overlap(tmp_path: Path) -> None:
    pool = PortPool("hv1", 11000, 6, tmp_path)
    other_run = PortPool("hv1", 11000, 6, tmp_path)  # another fleet process, same host
    first = pool.lease(2, "vm1")
    second = other_run.lease(3, "vm2")
    assert first is not None and second is not None
    assert (first.first, second.first) == (11000, 11002)
    assert pool.lease(2, "vm3") is None  # one port left
    third = pool.lease(1, "vm3")
    assert third is not None and third.first == 11005
    first.release()
    again = other_run.lease(2, "vm4")
    assert again is not None and again.first == 11000
    with pytest.raises(TargetError, match="needs 7 NBD ports"):
        pool.lease(7, "big")
    assert PortPool("hv2", 11000, 6, tmp_path).lease(6, "vm") is not None  # ports per host


def test_vm_folder_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    lock = lock_vm_folder(tmp_path / "h" / "vm", "run 1")
    with pytest.raises(FolderLocked, match="run 1"):
        lock_vm_folder(tmp_path / "h" / "vm", "run 2")
    lock.release()
    lock_vm_folder(tmp_path / "h" / "vm", "run 2").release()


def test_ledger_and_retry_set(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    run1 = ledger.start_run(100.0, ["virtnbdfleet"], 2)

    def job(run: int, host: str, vm: str, state: str) -> None:
        row = ledger.start_job(run, 100.0, hypervisor=host, uri="u", vm=vm, tags=("t",))
        ledger.update_job(row, state=state, ended=101.0)

    job(run1, "a", "ok1", "ok")
    job(run1, "a", "bad1", "failed")
    job(run1, "a", "cut", "interrupted")
    job(run1, "a", "never", "cancelled")
    job(run1, "b", "warn", "warning")
    job(run1, "b", "fixed", "failed")
    run2 = ledger.start_run(200.0, ["virtnbdfleet"], 2)
    job(run2, "b", "fixed", "ok")
    job(run2, "b", "", "failed")  # hypervisor b unreachable after its VMs' last jobs
    assert retry_set(ledger) == {("a", "bad1"), ("a", "cut"), ("a", "never"), ("b", "warn"),
                                 ("b", "fixed")}  # fmt: skip
    rows = ledger.jobs(run1)
    assert len(rows) == 6 and rows[0].tags == ("t",)
    ledger.close()
    Ledger(tmp_path).close()  # opened again: the schema is kept
    db = sqlite3.connect(tmp_path / "virtnbdfleet.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(TargetError, match="newer virtnbdfleet"):
        Ledger(tmp_path)
    with pytest.raises(TargetError, match="holds no fleet ledger"):
        Ledger(tmp_path / "elsewhere", create=False)


def test_exit_codes() -> None:
    ok = [Outcome("a/1", "ok", ""), Outcome("a/2", "ok", "")]
    assert exit_code(ok, 0, True, False)[0] == 0
    assert exit_code(ok, 1, False, False)[0] == 0
    assert exit_code(ok, 1, True, False)[0] == 2
    warned = [*ok, Outcome("a/3", "warning", "w")]
    assert exit_code(warned, 0, False, False)[0] == 0
    assert exit_code(warned, 0, True, False)[0] == 2
    failed = [*warned, Outcome("a/4", "failed", "x")]
    assert exit_code(failed, 0, True, False) == (
        1,
        "fleet run finished: 1 failed, 2 ok, 1 warning",
    )
    assert exit_code(ok, 0, False, True)[0] == 1


def test_the_example_configuration_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "contrib" / "virtnbdfleet.toml.example"
    config = load_config(example)
    assert [h.name for h in config.hypervisors] == ["backup1", "hv1"]
    assert config.settings_for(config.hypervisors[1], "db1").level == "diff"
    assert config.settings_for(config.hypervisors[0], "webvm").exclude_disks == ("vdb",)


def test_retention_rules_become_prune_options(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        "[retention]\nkeep_daily = 7\nkeep_monthly = 6\nkeep_within = '14d'\nverify = true\n"
    )
    retention = load_config(path).retention
    assert retention is not None
    assert retention.prune_args() == [
        "--keep-daily", "7", "--keep-monthly", "6", "--keep-within", "14d", "--verify",
    ]  # fmt: skip
    prune = prune_parser().parse_args(["-i", "x", *retention.prune_args()])
    assert (prune.keep_daily, prune.keep_monthly, prune.keep_within) == (7, 6, "14d")


def test_password_reaches_the_backups_through_their_environment(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\nignored\n")
    path = tmp_path / "fleet.toml"
    path.write_text(f"[[hypervisor]]\nuri = 'qemu+ssh://hv/system'\npassword_file = '{secret}'\n")
    host = load_config(path).hypervisors[0]
    assert host.password == "s3cret"
    assert child_env(host)[PASSWORD_ENV] == "s3cret" and PASSWORD_ENV == COMMON_PASSWORD_ENV
    job = plan_jobs(
        FleetConfig(output=tmp_path, hypervisors=[host], selection=Selection(select_all=True)),
        datetime(2026, 11, 5),
        connect=lambda h: [summary("vm1")],
    ).jobs[0]
    argv = backup_command(job, FleetConfig(output=tmp_path), 10809)
    assert "s3cret" not in argv and "--password" not in argv
    assert argv[argv.index("-P") + 1] == "10809"
    assert redacted(["virtnbdfleet", "--password", "x", "--password=y"]) == [
        "virtnbdfleet", "--password", "***", "--password=***",
    ]  # fmt: skip


def test_a_first_release_ledger_gets_the_retention_columns(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "virtnbdfleet.sqlite")
    old = SCHEMA.replace("    prune_state TEXT,\n    prune_message TEXT\n", "")
    old = old.replace("nbd_port INTEGER,", "nbd_port INTEGER")
    db.executescript(old + "PRAGMA user_version = 1;")
    db.execute(
        "INSERT INTO runs (started, state, pid, node, argv, jobs_limit) "
        "VALUES (1, 'done', 1, 'n', '[]', 1)"
    )
    db.execute(
        "INSERT INTO jobs (run_id, hypervisor, uri, vm, state, started) "
        "VALUES (1, 'h', 'u', 'vm1', 'ok', 1)"
    )
    db.commit()
    db.close()
    ledger = Ledger(tmp_path)
    (row,) = ledger.jobs()
    assert (row.vm, row.state, row.prune_state) == ("vm1", "ok", None)
    ledger.update_job(row.id, prune_state="ok")
    assert ledger.jobs()[0].prune_state == "ok"


def test_status_per_vm_from_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    run1 = ledger.start_run(100.0, ["virtnbdfleet"], 2)

    def job(run: int, vm: str, state: str, ended: float | None, tags: tuple[str, ...] = ()) -> None:
        row = ledger.start_job(run, 100.0, hypervisor="h", uri="u", vm=vm, tags=tags)
        ledger.update_job(row, state=state, ended=ended, bytes=5, message=f"{vm} {state}")

    job(run1, "a", "ok", 110.0, ("nightly",))
    job(run1, "b", "ok", 110.0)
    job(run1, "c", "failed", 111.0)
    ledger.end_run(run1, 120.0, "done", 1, 1, "")
    run2 = ledger.start_run(200.0, ["virtnbdfleet"], 2)
    job(run2, "b", "failed", 210.0)
    job(run2, "a", "running", None, ("nightly",))  # its run was killed hard
    ledger.close()
    db = sqlite3.connect(tmp_path / "virtnbdfleet.sqlite")
    db.execute("UPDATE runs SET pid = 999999999 WHERE id = ?", (run2,))
    db.commit()
    db.close()
    ledger = Ledger(tmp_path, create=False)
    rows = {r.vm: r for r in fleet_status(ledger)}
    assert rows["a"].state == "lost" and rows["a"].last_good is not None
    assert rows["a"].age(1110.0) == 1000.0
    assert rows["b"].state == "failed" and rows["b"].last_good is not None
    assert rows["b"].last_failure is not None and rows["b"].last_failure.message == "b failed"
    assert rows["c"].last_good is None and rows["c"].age(1110.0) is None
    tagged = fleet_status(ledger, Selection(parse_selectors(["tag:nightly"])))
    assert [r.vm for r in tagged] == ["a"]
    assert fleet_status(ledger, hosts={"other"}) == []
    report = rows["b"].as_dict(1110.0)
    assert report["state"] == "failed" and report["last_good"]["bytes"] == 5


def test_per_vm_settings_reach_the_backup_command_line(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        f'output = "{tmp_path}"\nall = true\n[vm.db1]\nfreeze = ["/", "/var/lib/mysql"]\n'
        'exclude_disks = ["vdb", "vdc"]\ncompress = 9\nargs = ["--threshold", "4096"]\n'
    )
    config = fleet_config(build_parser().parse_args(["backup", "-c", str(path)]))
    job = plan_jobs(config, datetime(2026, 11, 5), connect=lambda h: [summary("db1")]).jobs[0]
    argv = backup_command(job, config, None)
    assert argv[argv.index("-F") + 1] == "/,/var/lib/mysql"  # virtnbdbackup -F
    assert argv[argv.index("-x") + 1] == "vdb,vdc"
    assert argv[argv.index("-z") + 1] == "9"
    assert argv[-2:] == ["--threshold", "4096"]
    assert argv[argv.index("-l") + 1] == "full" and "-P" not in argv  # local: no port
    from libvirtnbdbackup.cli.backup import build_parser as backup_parser

    parsed = backup_parser().parse_args(argv[4:])  # after python -m launcher virtnbdbackup
    assert parsed.freeze_mountpoint == "/,/var/lib/mysql" and parsed.domain == "db1"
