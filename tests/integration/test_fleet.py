"""virtnbdfleet against real VMs: four on the local libvirtd and two more
reached as a second hypervisor over qemu+ssh to 127.0.0.1 (the same
libvirtd, through a private sshd: NBD over TCP on ports the fleet hands
out). Every backup the fleet takes is restored and compared bit for bit."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from libvirtnbdbackup.adapters.virt import FLEET_METADATA_NS
from libvirtnbdbackup.format.reader import read_meta
from libvirtnbdbackup.targets.lock import FolderLock

from .remotelab import SshServer, free_ports, ssh_server
from .vmlab import (
    BIN,
    LAB_DIR,
    NAME_PREFIX,
    DiskSpec,
    LabVM,
    MiB,
    destroy,
    domain_xml,
    hmp_io,
    images_identical,
    make_image,
    restore_image,
    run_tool,
    sh,
)

RUN = uuid.uuid4().hex[:4]
PREFIX = f"{NAME_PREFIX}{RUN}-"  # every VM of this module, and only them


def make_vm(
    conn: libvirt.virConnect,
    name: str,
    disks: list[DiskSpec],
    tags: tuple[str, ...] = (),
    start: bool = True,
) -> LabVM:
    name = PREFIX + name
    folder = LAB_DIR / name
    folder.mkdir(parents=True)
    os.chmod(LAB_DIR, 0o755)
    os.chmod(folder, 0o755)
    images: dict[str, tuple[Path, str]] = {}
    for spec in disks:
        path = folder / f"{spec.target}.{spec.fmt}"
        make_image(path, spec)
        images[spec.target] = (path, spec.fmt)
    dom = conn.defineXML(domain_xml(name, images, cdrom=False))
    if tags:
        body = "".join(f"<tag>{t}</tag>" for t in tags)
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            f"<fleet>{body}</fleet>",
            "vnbfleet",
            FLEET_METADATA_NS,
            libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )
    if start:
        dom.create()
    return LabVM(name, dom, {t: p for t, (p, _f) in images.items()}, folder)


def backed_up(row: dict[str, object]) -> bool:
    """A job that backed up its VM: ok, or, for a running VM, a warning that
    is the freeze's: these firmware-only VMs have no guest agent, and the
    fleet runs each job with --strict (2.47 warns there too)."""
    if row["state"] == "ok":
        return row["exit_code"] == 0
    return (
        row["state"] == "warning"
        and row["exit_code"] == 2
        and "guest filesystems not frozen" in str(row["message"])
    )


def small(target: str, byte: int, size: int = 64 * MiB) -> DiskSpec:
    return DiskSpec(target, size, writes=[f"write -P {byte:#x} 0 1M", "write -P 0x5a 20M 2M"])


@dataclass
class Lab:
    local: dict[str, LabVM]  # web1, web2, db1, mail
    remote: dict[str, LabVM]  # app1, app2 (backed up through the "remote" hypervisor)
    sshd: SshServer

    @property
    def all(self) -> dict[str, LabVM]:
        return {**self.local, **self.remote}


@pytest.fixture(scope="module")
def lab(conn: libvirt.virConnect) -> Iterator[Lab]:
    vms: list[LabVM] = []
    try:
        with ssh_server() as sshd:
            local = {
                "web1": make_vm(conn, "web1", [small("vda", 0x11)], tags=("nightly",)),
                "web2": make_vm(conn, "web2", [small("vda", 0x12)]),
                "db1": make_vm(conn, "db1", [small("vda", 0x13), small("vdb", 0x23, 32 * MiB)]),
                "mail": make_vm(conn, "mail", [small("vda", 0x14)], tags=("nightly", "mx")),
            }
            vms += local.values()
            remote = {
                "app1": make_vm(conn, "r-app1", [small("vda", 0x15)]),
                "app2": make_vm(conn, "r-app2", [small("vda", 0x16)], start=False),
            }
            vms += remote.values()
            yield Lab(local, remote, sshd)
    finally:
        for vm in vms:
            destroy(vm.dom)
            sh("rm", "-rf", vm.folder)


def fleet(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return run_tool("virtnbdfleet", *args, env=env, timeout=timeout)


def config_file(folder: Path, lab: Lab, root: Path, extra: str = "", **top: object) -> Path:
    """Both hypervisors: the local one with the four local VMs, the remote one
    (over the lab's sshd) with the two others."""
    settings = "\n".join(f"{k} = {json.dumps(v)}" for k, v in top.items())
    path = folder / "fleet.toml"
    path.write_text(
        f"""output = "{root}"
{settings}

[[hypervisor]]
uri = "qemu:///system"
name = "local"
select = ["{PREFIX}web*", "{PREFIX}db1", "{PREFIX}mail"]

[[hypervisor]]
uri = "{lab.sshd.uri}"
name = "remote"
nbd_port = {free_ports(8)}
nbd_ports = 8
select = ["re:^{PREFIX}r-app[0-9]$"]
{extra}
"""
    )
    return path


def ledger_rows(root: Path, run: int | None = None) -> list[dict[str, object]]:
    db = sqlite3.connect(root / "virtnbdfleet.sqlite")
    db.row_factory = sqlite3.Row
    where = "" if run is None else f"WHERE run_id = {int(run)}"
    rows = [dict(r) for r in db.execute(f"SELECT * FROM jobs {where} ORDER BY id")]
    db.close()
    return rows


def last_run(root: Path) -> dict[str, object]:
    db = sqlite3.connect(root / "virtnbdfleet.sqlite")
    db.row_factory = sqlite3.Row
    row = dict(db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone())
    db.close()
    return row


def max_overlap(rows: list[dict[str, object]]) -> int:
    """The most jobs running at one instant, from their start and end times."""
    events = []
    for row in rows:
        events += [(float(row["started"]), 1), (float(row["ended"]), -1)]  # type: ignore[arg-type]
    running = peak = 0
    for _when, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def assert_restores(vm: LabVM, folder: Path, dest: Path, disks: list[str] | None = None) -> None:
    """Every disk of the backup in ``folder`` restores identical to the VM's image."""
    for disk in disks or sorted(vm.images):
        out = dest / f"{vm.name}-{disk}"
        image = restore_image(folder, out, "-d", disk)
        assert images_identical(vm.images[disk], image), f"{vm.name} {disk} differs"


def dry_run(*args: str | Path) -> set[str]:
    proc = fleet("backup", "-n", *args)
    assert proc.returncode == 0, proc.stderr
    return {line.split("\t")[0] for line in proc.stdout.splitlines()}


def test_selection_by_each_selector_kind(lab: Lab, tmp_path: Path) -> None:
    root = tmp_path / "root"
    local = {f"localhost/{vm.name}" for vm in lab.all.values()}
    names = {key: f"localhost/{vm.name}" for key, vm in lab.all.items()}
    assert dry_run("-o", root, "--select", lab.local["db1"].name) == {names["db1"]}
    assert dry_run("-o", root, "--select", f"{PREFIX}web?") == {names["web1"], names["web2"]}
    assert dry_run("-o", root, "--select", f"re:^{PREFIX}(db|mail)") == {
        names["db1"],
        names["mail"],
    }
    # Tags: from the domain's fleet metadata element.
    assert dry_run("-o", root, "--select", "tag:nightly") >= {names["web1"], names["mail"]}
    assert dry_run("-o", root, "--select", "tag:mx", "--select", "tag:nightly") & local == {
        names["web1"],
        names["mail"],
    }
    # --all, confined to this module's VMs (never another lab's) by --exclude.
    everything = dry_run("-o", root, "--all", "--exclude", f"re:^(?!{PREFIX})")
    assert everything == local
    assert dry_run(
        "-o", root, "--all", "--exclude", f"re:^(?!{PREFIX})", "--exclude", "tag:nightly",
        "--exclude", f"{PREFIX}r-*",
    ) == {names["web2"], names["db1"]}  # fmt: skip
    assert not root.exists(), "a dry run writes nothing"

    # The configuration: each hypervisor its own selection, the remote one over SSH.
    proc = run_tool(
        "virtnbdfleet", "backup", "-n", "-c", config_file(tmp_path, lab, root), env=lab.sshd.env
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert {line[0] for line in lines} == {f"local/{vm.name}" for vm in lab.local.values()} | {
        f"remote/{vm.name}" for vm in lab.remote.values()
    }
    month = time.strftime("%Y-%m")
    assert all(line[1] == "full" and line[2].endswith(f"/{month}") for line in lines)

    nothing = fleet("backup", "-o", root)
    assert nothing.returncode == 1 and "nothing is selected" in nothing.stderr


@pytest.fixture(scope="module")
def fleet_root(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run over both hypervisors: 3 jobs at once, 2 per hypervisor;
    db1 without its disk vdb, app1 compressed."""
    folder = tmp_path_factory.mktemp("fleet")
    root = folder / "root"
    extra = f"""
[vm."{lab.local['db1'].name}"]
exclude_disks = ["vdb"]

[hypervisor.vm."{lab.remote['app1'].name}"]
compress = 2
"""
    config = config_file(folder, lab, root, extra, jobs=3, host_jobs=2)
    proc = run_tool("virtnbdfleet", "backup", "-c", config, env=lab.sshd.env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root


def test_fleet_backs_up_both_hypervisors_within_the_limits(lab: Lab, fleet_root: Path) -> None:
    rows = ledger_rows(fleet_root)
    assert len(rows) == 6
    assert all(backed_up(r) and r["level"] == "full" for r in rows), rows
    assert all(int(r["bytes"]) > 0 and float(r["throughput"]) > 0 for r in rows)  # type: ignore[arg-type]
    assert 2 <= max_overlap(rows) <= 3  # three slots: the first three start at once
    for host in ("local", "remote"):
        assert max_overlap([r for r in rows if r["hypervisor"] == host]) <= 2
    remote = [r for r in rows if r["hypervisor"] == "remote"]
    assert all(r["nbd_port"] for r in remote)
    overlapping = max_overlap(remote) > 1
    if overlapping:  # jobs running at once never share a port
        assert remote[0]["nbd_port"] != remote[1]["nbd_port"]
    assert all(r["nbd_port"] is None for r in rows if r["hypervisor"] == "local")
    run = last_run(fleet_root)
    assert run["state"] == "done" and run["exit_code"] == 0 and int(run["peak_rss_kib"]) > 0  # type: ignore[arg-type]


def test_every_fleet_backup_restores_bit_identical(
    lab: Lab, fleet_root: Path, tmp_path: Path
) -> None:
    month = time.strftime("%Y-%m")
    for key, vm in lab.all.items():
        host = "remote" if key in lab.remote else "local"
        folder = fleet_root / host / vm.name / month
        assert (folder / f"{vm.name}.cpt").is_file() or key == "app2"  # app2 is shut off
        disks = ["vda"] if key == "db1" else None
        assert_restores(vm, folder, tmp_path, disks)
    assert not list((fleet_root / "local" / lab.local["db1"].name).glob("*/vdb.*"))
    app1 = fleet_root / "remote" / lab.remote["app1"].name / month
    assert read_meta(str(app1 / "vda.full.data")).compressed == 2  # its own setting
    web1 = fleet_root / "local" / lab.local["web1"].name / month
    assert read_meta(str(web1 / "vda.full.data")).compressed is False


def test_status_json_and_max_age(lab: Lab, fleet_root: Path) -> None:
    proc = fleet("status", "-o", fleet_root, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    vms = {(v["hypervisor"], v["vm"]): v for v in report["vms"]}
    assert len(vms) == 6
    for vm in vms.values():
        assert vm["state"] in ("ok", "warning") and vm["last_failure"] is None
        assert vm["last_good"]["bytes"] > 0 and 0 <= vm["age_seconds"] < 3600
    assert vms[("local", lab.local["mail"].name)]["tags"] == ["nightly", "mx"]

    text = fleet("status", "-o", fleet_root)
    assert text.returncode == 0 and lab.local["web1"].name in text.stdout
    assert fleet("status", "-o", fleet_root, "--max-age", "26h").returncode == 0
    # Two days later, every backup is too old; only the selected VMs count.
    later = {**os.environ, "VIRTNBDFLEET_NOW": str(time.time() + 2 * 86400)}
    stale = fleet("status", "-o", fleet_root, "--max-age", "26h", env=later)
    assert stale.returncode == 1
    assert f"local/{lab.local['web1'].name}: last good backup 2d" in stale.stderr
    assert fleet("status", "-o", fleet_root, "--max-age", "3d", env=later).returncode == 0
    only = fleet(
        "status", "-o", fleet_root, "--max-age", "26h", "--select", "tag:mx", "--json", env=later
    )
    assert only.returncode == 1 and len(json.loads(only.stdout)["vms"]) == 1
    assert lab.local["web1"].name not in only.stderr


def test_a_failing_vm_does_not_stop_the_others_and_retry_redoes_it(
    lab: Lab, conn: libvirt.virConnect, tmp_path: Path
) -> None:
    broken = make_vm(conn, "broken", [small("vda", 0x31)], start=False)
    try:
        os.rename(broken.images["vda"], broken.images["vda"].with_suffix(".gone"))
        root = tmp_path / "root"
        web1, web2 = lab.local["web1"], lab.local["web2"]
        web2_folder = root / "localhost" / web2.name
        held = web1_folder = root / "localhost" / web1.name
        web1_folder.mkdir(parents=True)
        web2_folder.mkdir(parents=True)
        # A lock left by a killed run (nobody holds it): taken over with a warning.
        (web2_folder / ".virtnbdbackup.lock").write_text(
            json.dumps({"pid": 999999, "host": os.uname().nodename, "purpose": "old run"})
        )
        select = ["--select", web1.name, "--select", web2.name, "--select", broken.name]
        with FolderLock(held, "a test holding web1"):  # another run backs up web1 now
            proc = fleet("backup", "-o", root, "--jobs", "2", *select)
        assert proc.returncode == 1, proc.stderr
        rows = {r["vm"]: r for r in ledger_rows(root)}
        assert backed_up(rows[web2.name])
        assert rows[broken.name]["state"] == "failed" and rows[broken.name]["exit_code"] == 1
        assert "vda" in str(rows[broken.name]["message"]) or "gone" in str(
            rows[broken.name]["message"]
        ), rows[broken.name]
        assert rows[web1.name]["state"] == "failed"
        assert "a test holding web1" in str(rows[web1.name]["message"])
        assert "old run" in proc.stderr and "taken over" in proc.stderr

        os.rename(broken.images["vda"].with_suffix(".gone"), broken.images["vda"])
        retry = fleet("backup", "-o", root, "--retry-failed", *select)
        assert retry.returncode == 0, retry.stderr
        run = int(last_run(root)["id"])  # type: ignore[arg-type]
        again = {r["vm"]: r for r in ledger_rows(root, run)}
        assert set(again) == {web1.name, broken.name}
        assert all(backed_up(r) for r in again.values()), again
        month = time.strftime("%Y-%m")
        assert_restores(broken, root / "localhost" / broken.name / month, tmp_path / "r1")
        assert_restores(web1, root / "localhost" / web1.name / month, tmp_path / "r2")
        assert_restores(web2, web2_folder / month, tmp_path / "r3")

        nothing = fleet("backup", "-o", root, "--retry-failed", *select)
        assert nothing.returncode == 0, nothing.stderr
        assert ledger_rows(root, int(last_run(root)["id"])) == []  # type: ignore[arg-type]
    finally:
        destroy(broken.dom)
        sh("rm", "-rf", broken.folder)


def test_each_month_starts_a_new_full(lab: Lab, tmp_path: Path) -> None:
    root = tmp_path / "root"
    vm = lab.local["web2"]
    base = ["backup", "-o", root, "--select", vm.name]

    def at(when: str) -> None:
        proc = fleet(*base, env={**os.environ, "VIRTNBDFLEET_NOW": when})
        assert proc.returncode == 0, proc.stderr

    at("2026-11-05T10:00:00")
    hmp_io(vm, "vda", "write -P 0x71 30M 1M")
    at("2026-11-20T10:00:00")
    november = root / "localhost" / vm.name / "2026-11"
    assert (november / "vda.full.data").is_file()
    assert (november / "vda.inc.virtnbdbackup.1.data").is_file()
    assert_restores(vm, november, tmp_path / "nov")
    hmp_io(vm, "vda", "write -P 0x72 40M 1M")
    at("2026-12-01T00:30:00")
    december = root / "localhost" / vm.name / "2026-12"
    assert (december / "vda.full.data").is_file()
    assert not list(december.glob("*.inc.*"))
    assert [r["level"] for r in ledger_rows(root)] == ["full", "inc", "full"]
    assert [r["period"] for r in ledger_rows(root)] == ["2026-11", "2026-11", "2026-12"]
    assert_restores(vm, december, tmp_path / "dec")
    assert not images_identical(
        vm.images["vda"], restore_image(november, tmp_path / "nov2", "-d", "vda")
    ), "November's set still holds November's data"


@pytest.fixture(scope="module")
def busy_vm(conn: libvirt.virConnect) -> Iterator[LabVM]:
    """Incompressible data that lz4 at level 16 takes a while over."""
    vm = make_vm(conn, "busy", [DiskSpec("vda", 384 * MiB, random_mib=256)])
    yield vm
    destroy(vm.dom)
    sh("rm", "-rf", vm.folder)


def wait_for_data(proc: subprocess.Popen[str], partial: Path) -> None:
    """Until the backup writing ``partial`` has written a MiB of it."""
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > MiB):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the busy VM's backup never got going"
        time.sleep(0.05)


def test_sigterm_stops_every_job_and_records_what_was_cut_short(
    lab: Lab, busy_vm: LabVM, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    web1 = lab.local["web1"]
    proc = subprocess.Popen(
        [BIN / "virtnbdfleet", "backup", "-o", root, "--jobs", "1", "-z", "16",
         "--select", busy_vm.name, "--select", web1.name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    partial = root / "localhost" / busy_vm.name / time.strftime("%Y-%m") / "vda.full.data.partial"
    wait_for_data(proc, partial)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    rows = {r["vm"]: r for r in ledger_rows(root)}
    assert rows[busy_vm.name]["state"] == "interrupted", rows
    assert rows[busy_vm.name]["ended"] is not None
    assert rows[web1.name]["state"] == "cancelled"
    assert last_run(root)["state"] == "interrupted"
    folder = partial.parent
    assert not list(folder.glob("*.partial")) and not list(folder.glob("*.data"))
    assert busy_vm.state() == libvirt.VIR_DOMAIN_RUNNING and not busy_vm.has_job()
    assert busy_vm.checkpoints() == []

    status = json.loads(fleet("status", "-o", root, "--json").stdout)
    states = {v["vm"]: v["state"] for v in status["vms"]}
    assert states == {busy_vm.name: "interrupted", web1.name: "cancelled"}
    retry = fleet("backup", "-n", "-o", root, "--retry-failed", "--all")
    assert {line.split("\t")[0] for line in retry.stdout.splitlines()} == {
        f"localhost/{busy_vm.name}",
        f"localhost/{web1.name}",
    }


def test_retention_rules_run_after_each_backup(lab: Lab, tmp_path: Path) -> None:
    """keep_last = 2 over a full and two incs: the full and the first inc are
    merged into one full by virtnbdprune, which the next inc continues."""
    vm = lab.local["mail"]
    root = tmp_path / "root"
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'output = "{root}"\nselect = ["{vm.name}"]\n\n[retention]\nkeep_last = 2\n'
    )

    def at(day: int) -> None:
        env = {**os.environ, "VIRTNBDFLEET_NOW": f"2026-11-{day:02d}T10:00:00"}
        proc = fleet("backup", "-c", config, env=env)
        assert proc.returncode == 0, proc.stderr

    at(5)
    hmp_io(vm, "vda", "write -P 0x61 10M 1M")
    at(6)
    hmp_io(vm, "vda", "write -P 0x62 30M 1M")
    at(7)
    folder = root / "localhost" / vm.name / "2026-11"
    rows = ledger_rows(root)
    assert [(r["level"], r["prune_state"]) for r in rows] == [
        ("full", "ok"), ("inc", "ok"), ("inc", "ok"),
    ]  # fmt: skip
    assert all(backed_up(r) for r in rows), rows
    assert sorted(p.name for p in folder.glob("*.data")) == [
        "vda.full.data",
        "vda.inc.virtnbdbackup.2.data",
    ], "the full and the first inc were merged"
    hmp_io(vm, "vda", "write -P 0x63 50M 1M")
    at(8)  # the chain goes on from the merged full
    assert (folder / "vda.inc.virtnbdbackup.3.data").is_file()
    assert_restores(vm, folder, tmp_path / "restored")


def test_a_vm_destroyed_mid_backup_fails_alone(lab: Lab, busy_vm: LabVM, tmp_path: Path) -> None:
    root = tmp_path / "root"
    web2 = lab.local["web2"]
    proc = subprocess.Popen(
        [BIN / "virtnbdfleet", "backup", "-o", root, "--jobs", "2", "-z", "16",
         "--select", busy_vm.name, "--select", web2.name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    month = time.strftime("%Y-%m")
    wait_for_data(proc, root / "localhost" / busy_vm.name / month / "vda.full.data.partial")
    busy_vm.dom.destroy()  # the VM dies in the middle of its backup
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    rows = {r["vm"]: r for r in ledger_rows(root)}
    assert backed_up(rows[web2.name]), rows[web2.name]
    busy = rows[busy_vm.name]
    assert busy["state"] == "failed" and busy["exit_code"] == 1, busy
    assert busy["message"] and busy["ended"] is not None
    assert f"localhost/{busy_vm.name}: failed (exit 1)" in err
    assert_restores(web2, root / "localhost" / web2.name / month, tmp_path / "restored")
    assert not list((root / "localhost" / busy_vm.name / month).glob("*.data*"))
