"""virtnbdprune against a real chain: a week of daily incs and a diff of a running VM.

The VM's disk gets writes and discards through QEMU between the backups; a
reference image gets the same content offline, and a copy of it is kept at
every point. The backups are dated a day apart by rewriting the date in
each file's meta JSON (same length, checksum file rewritten) and the file
times, as if taken from Mon 2026-11-02 to Mon 2026-11-09.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import libvirt
import pytest

from libvirtnbdbackup.cli.backup import lock_backup_folder
from libvirtnbdbackup.format.index import file_fingerprint, open_index
from libvirtnbdbackup.format.reader import file_adler32, read_meta
from libvirtnbdbackup.jobs.backupoptions import BackupOptions

from .vmlab import (
    DiskSpec,
    GiB,
    LabVM,
    backup_ok,
    create_vm,
    hmp_io,
    images_identical,
    remove_vm,
    restore_image,
    run_tool,
    sh,
)

INITIAL = ["write -P 0xab 0 8M", "write -P 0xac 300M 4M", "write -P 0xad 900M 2M"]
# (level, fake date, [(live qemu-io command, offline command for the reference)])
SCHEDULE: list[tuple[str, datetime, list[tuple[str, str]]]] = [
    ("full", datetime(2026, 11, 2, 1), []),
    ("inc", datetime(2026, 11, 3, 1), [("write -P 0x11 10M 2M", "write -P 0x11 10M 2M")]),
    (
        "inc",
        datetime(2026, 11, 4, 1),
        [("write -P 0x21 11M 2M", "write -P 0x21 11M 2M"), ("discard 0 1M", "write -z 0 1M")],
    ),
    ("inc", datetime(2026, 11, 5, 1), [("write -P 0x31 302M 64K", "write -P 0x31 302M 64K")]),
    (
        "inc",
        datetime(2026, 11, 6, 1),
        [
            ("discard 300M 1M", "write -z 300M 1M"),
            ("write -P 0x41 500M 1M", "write -P 0x41 500M 1M"),
        ],
    ),
    ("diff", datetime(2026, 11, 6, 13), [("write -P 0x51 600M 1M", "write -P 0x51 600M 1M")]),
    ("inc", datetime(2026, 11, 7, 1), [("write -P 0x61 2M 1M", "write -P 0x61 2M 1M")]),
    ("inc", datetime(2026, 11, 8, 1), [("discard 10M 512K", "write -z 10M 512K")]),
    ("inc", datetime(2026, 11, 9, 1), [("write -P 0x81 901M 1M", "write -P 0x81 901M 1M")]),
]
DIFF = "diff"  # the key of the differential in Chain.references
I = "virtnbdbackup."  # noqa: E741 - short for the checkpoint prefix in the tables


@dataclass
class Chain:
    vm: LabVM
    folder: Path  # the live backup folder; tests work on copies of it
    references: dict[str, Path]  # point ident (or DIFF) -> expected image
    diff_ident: str
    compress: bool


def set_point_date(folder: Path, ident: str, when: datetime) -> None:
    """Date every file of a backup point ``when``: meta date, checksum, file times."""
    stamp = when.isoformat(timespec="microseconds")
    data_files = [p for p in folder.glob("*.data") if read_meta(str(p)).date and _ident(p) == ident]
    assert data_files, ident
    for path in data_files:
        with open(path, "r+b") as fh:
            head = fh.read(4096)
            match = re.search(rb'"date": "([0-9T:.-]{26})"', head)
            assert match, path
            fh.seek(match.start(1))
            fh.write(stamp.encode())
        Path(f"{path}.chksum").write_text(str(file_adler32(str(path))))
        zeros = Path(f"{path}.zeros")
        if zeros.is_file():  # as if the backup had been taken then: its fingerprint
            doc = json.loads(zeros.read_text())
            with open(path, "rb") as fh:
                doc["fingerprint"] = file_fingerprint(fh, doc["fileSize"])
            zeros.write_text(json.dumps(doc))
        Path(f"{path}.idx").unlink()
        zeros = Path(f"{path}.zeros")  # an inc's discarded ranges name the file's fingerprint
        if zeros.is_file():
            doc = json.loads(zeros.read_text())
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                doc["fileSize"], doc["fingerprint"] = size, file_fingerprint(fh, size)
            zeros.write_text(json.dumps(doc))
        with open(path, "rb") as fh:
            open_index(str(path), fh)  # rebuilt for the new fingerprint
    resum_manifests(folder)
    epoch = when.timestamp()
    for path in [*data_files, *folder.glob(f"*{ident}*")]:
        os.utime(path, (epoch, epoch))


def resum_manifests(folder: Path) -> None:
    """The commit points list the rewritten files as they are now."""
    for path in folder.glob("manifest.*.json"):
        doc = json.loads(path.read_text())
        for name, entry in doc["files"].items():
            if entry["adler32"] is not None:
                entry["size"] = (folder / name).stat().st_size
                entry["adler32"] = file_adler32(str(folder / name))
        path.write_text(json.dumps(doc))


def manifests_match(folder: Path) -> dict[str, dict]:
    """Every manifest's files exist with the size and Adler-32 it records."""
    docs = {}
    for path in folder.glob("manifest.*.json"):
        doc = json.loads(path.read_text())
        for name, entry in doc["files"].items():
            assert (folder / name).is_file(), (path.name, name)
            if entry["size"] is not None:
                assert (folder / name).stat().st_size == entry["size"], (path.name, name)
            if entry["adler32"] is not None:
                assert file_adler32(str(folder / name)) == entry["adler32"], (path.name, name)
        docs[doc["ident"]] = doc
    return docs


def _ident(path: Path) -> str:
    name = path.name
    for tag in (".diff.", ".inc."):
        if tag in name:
            return name.split(tag, 1)[1].removesuffix(".data")
    return read_meta(str(path)).checkpoint_name


def build_chain(vm: LabVM, root: Path, compress: bool) -> Chain:
    out = root / "live"
    reference = root / "reference.qcow2"
    sh("qemu-img", "convert", "-U", "-O", "qcow2", vm.images["vda"], reference)
    refs: dict[str, Path] = {}
    args = ["-z"] if compress else []
    number = 0
    diff_ident = ""
    for level, _when, writes in SCHEDULE:
        for live, offline in writes:
            hmp_io(vm, "vda", live)
            sh("qemu-io", "-f", "qcow2", "-c", offline, reference)
        backup_ok(vm, out, level, *args)
        if level == "diff":
            diff_ident = next(out.glob("vda.diff.*.data")).name.split(".")[2]
            key = DIFF
        else:
            key = f"virtnbdbackup.{number}"
            number += 1
        refs[key] = root / f"expected.{key}.qcow2"
        shutil.copyfile(reference, refs[key])
    number = 0
    for level, when, _writes in SCHEDULE:
        if level == "diff":
            set_point_date(out, diff_ident, when)
        else:
            set_point_date(out, f"virtnbdbackup.{number}", when)
            number += 1
    return Chain(vm, out, refs, diff_ident, compress)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "lz4"])
def chain(
    request: pytest.FixtureRequest,
    conn: libvirt.virConnect,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Chain]:
    vm = create_vm(conn, [DiskSpec("vda", 1 * GiB, writes=INITIAL)], cdrom=False)
    try:
        yield build_chain(vm, tmp_path_factory.mktemp("prune"), request.param)
    finally:
        remove_vm(vm)


PROTECTED = {3: f"{I}2"}  # rule set -> the point protected before it runs


def detached_copy(chain: Chain, dest: Path, rules: int | None = None) -> Path:
    """A copy of the chain's folder whose domain libvirt does not know, so that a
    prune of it leaves the live chain's checkpoints alone; with ``rules``, the
    point that rule set expects protected is protected."""
    shutil.copytree(chain.folder, dest, copy_function=shutil.copy2)
    (dest / f"{chain.vm.name}.cpt").rename(dest / "detached-copy.cpt")
    if rules in PROTECTED:
        (dest / f"{PROTECTED[rules]}.protect").touch()
    return dest


def prune(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("virtnbdprune", "-i", folder, "-n", *args)


def table_actions(stdout: str) -> dict[str, tuple[str, str]]:
    """POINT -> (ACTION, REASON) from a prune's table."""
    rows = {}
    for line in stdout.strip().splitlines()[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[1]] = (cells[4], cells[5] if len(cells) > 5 else "")
    return rows


def snapshot(folder: Path) -> dict[str, tuple[str, float]]:
    """Every file of a folder: content hash and mtime."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def expected_rows(chain: Chain, rows: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    return {(chain.diff_ident if k == DIFF else k): v for k, v in rows.items()}


# Rule sets and their hand-computed tables (points: .0 Mon 11-02 full, .1-.4
# Tue-Fri, the diff Fri 13:00 on .4, .5 Sat, .6 Sun, .7 Mon 11-09).
RULE_SETS: list[tuple[list[str], dict[str, tuple[str, str]]]] = [
    (
        ["--keep-last", "3"],
        {
            f"{I}0": ("merge", f"into the new full at {I}5"),
            f"{I}1": ("merge", f"into the new full at {I}5"),
            f"{I}2": ("merge", f"into the new full at {I}5"),
            f"{I}3": ("merge", f"into the new full at {I}5"),
            f"{I}4": ("merge", f"into the new full at {I}5"),
            DIFF: ("remove", "no rule keeps it"),
            f"{I}5": ("keep", "last 3; becomes the full"),
            f"{I}6": ("keep", "last 3"),
            f"{I}7": ("keep", "last 3"),
        },
    ),
    (
        ["--keep-within", "2d12h"],  # from Mon 01:00 back to Fri 13:00: the diff and later
        {
            f"{I}0": ("merge", f"into the new full at {I}4"),
            f"{I}1": ("merge", f"into the new full at {I}4"),
            f"{I}2": ("merge", f"into the new full at {I}4"),
            f"{I}3": ("merge", f"into the new full at {I}4"),
            f"{I}4": ("keep", "parent of kept diff DIFF; becomes the full"),
            DIFF: ("keep", "within 2d12h"),
            f"{I}5": ("keep", "within 2d12h"),
            f"{I}6": ("keep", "within 2d12h"),
            f"{I}7": ("keep", "within 2d12h"),
        },
    ),
    (
        ["--keep-weekly", "1", "--keep-daily", "2"],  # week 46 is Mon 11-09 alone
        {
            f"{I}0": ("merge", f"into the new full at {I}6"),
            f"{I}1": ("merge", f"into the new full at {I}6"),
            f"{I}2": ("merge", f"into the new full at {I}6"),
            f"{I}3": ("merge", f"into the new full at {I}6"),
            f"{I}4": ("merge", f"into the new full at {I}6"),
            DIFF: ("remove", "no rule keeps it"),
            f"{I}5": ("merge", f"into the new full at {I}6"),
            f"{I}6": ("keep", "daily 2; becomes the full"),
            f"{I}7": ("keep", "daily 2, weekly 1"),
        },
    ),
    (
        ["--keep-last", "1"],  # with .2 protected: a new full at .2, .3-.6 merged into .7
        {
            f"{I}0": ("merge", f"into the new full at {I}2"),
            f"{I}1": ("merge", f"into the new full at {I}2"),
            f"{I}2": ("keep", "protected; becomes the full"),
            f"{I}3": ("merge", f"into {I}7"),
            f"{I}4": ("merge", f"into {I}7"),
            DIFF: ("remove", "no rule keeps it"),
            f"{I}5": ("merge", f"into {I}7"),
            f"{I}6": ("merge", f"into {I}7"),
            f"{I}7": ("keep", "last 1"),
        },
    ),
    (
        ["--keep-daily", "10"],  # Friday's newest point is the diff: .4 only needed by it
        {
            f"{I}0": ("keep", "daily 10"),
            f"{I}1": ("keep", "daily 10"),
            f"{I}2": ("keep", "daily 10"),
            f"{I}3": ("keep", "daily 10"),
            f"{I}4": ("keep", "parent of kept diff DIFF"),
            DIFF: ("keep", "daily 10"),
            f"{I}5": ("keep", "daily 10"),
            f"{I}6": ("keep", "daily 10"),
            f"{I}7": ("keep", "daily 10"),
        },
    ),
]


@pytest.mark.parametrize("rules", range(len(RULE_SETS)))
def test_dry_run_tables(chain: Chain, tmp_path: Path, rules: int) -> None:
    if chain.compress and rules:
        pytest.skip("the table does not depend on compression; checked on the plain chain")
    folder = detached_copy(chain, tmp_path / "set", rules)
    before = snapshot(folder)
    args, expected = RULE_SETS[rules]
    proc = prune(folder, "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    want = {
        k: (a, r.replace("DIFF", chain.diff_ident))
        for k, (a, r) in expected_rows(chain, expected).items()
    }
    assert table_actions(proc.stdout) == want
    assert snapshot(folder) == before


def test_protect_marker_pins_a_point(chain: Chain, tmp_path: Path) -> None:
    if chain.compress:
        pytest.skip("checked on the plain chain")
    folder = detached_copy(chain, tmp_path / "set")
    assert prune(folder, "--protect", f"{I}2").returncode == 0
    assert (folder / f"{I}2.protect").is_file()
    proc = prune(folder, "--dry-run", "--keep-last", "1")
    assert table_actions(proc.stdout)[f"{I}2"] == ("keep", "protected; becomes the full")
    assert prune(folder, "--unprotect", f"{I}2").returncode == 0
    assert not (folder / f"{I}2.protect").exists()
    proc = prune(folder, "--dry-run", "--keep-last", "1")
    assert table_actions(proc.stdout)[f"{I}2"] == ("merge", f"into the new full at {I}7")
    bad = prune(folder, "--protect", "virtnbdbackup.42")
    assert bad.returncode == 1 and "holds no backup virtnbdbackup.42" in bad.stderr


def restores_identical(chain: Chain, folder: Path, work: Path, points: list[str]) -> None:
    """Each point restores as the reference, with ours and replaying 2.47's file order."""
    files = sorted(folder.glob("vda.*.data"), key=lambda p: p.stat().st_mtime)
    assert ".full." in files[0].name, "2.47 needs the full backup first in mtime order"
    links = [p for p in files if ".diff." not in p.name]
    for point in points:
        key = DIFF if point == chain.diff_ident else point
        if key == DIFF:  # its checkpoint name is also inc .5's: name the files
            parent = read_meta(str(folder / f"vda.diff.{point}.data")).parent_checkpoint
            upto = [p.name for p in links if read_meta(str(p)).checkpoint_name <= parent]
            sequence = ",".join([*upto, f"vda.diff.{point}.data"])
            dest = restore_image(folder, work / f"until-{point}", "--sequence", sequence)
        else:
            dest = restore_image(folder, work / f"until-{point}", "--until", point)
        assert images_identical(chain.references[key], dest), f"{point} differs"
        if key == DIFF:
            continue
        # 2.47 applies the files in mtime order, full first, up to the point.
        names = [p.name for p in links]
        upto = next(i for i, p in enumerate(links) if read_meta(str(p)).checkpoint_name == point)
        dest = restore_image(
            folder, work / f"seq-{point}", "--sequence", ",".join(names[: upto + 1])
        )
        assert images_identical(chain.references[key], dest), f"{point} (mtime order) differs"


@pytest.mark.parametrize("rules", [0, 1, 2, 3])
def test_prune_keeps_every_kept_point_bit_identical(
    chain: Chain, tmp_path: Path, rules: int
) -> None:
    if not chain.compress and rules == 2:
        pytest.skip("one merge into the newest link is enough, on the lz4 chain")
    folder = detached_copy(chain, tmp_path / "set", rules)
    args, expected = RULE_SETS[rules]
    verify = ["--verify"] if rules == 3 else []  # every byte compared, not a sample
    proc = prune(folder, *args, *verify)
    assert proc.returncode == 0, proc.stderr
    want = expected_rows(chain, expected)
    kept = [k for k, (a, _r) in want.items() if a == "keep"]
    base = next(k for k in kept if k != chain.diff_ident)
    names = sorted(p.name for p in folder.glob("*.data"))
    assert names == sorted(
        ["vda.full.data"]
        + [f"vda.inc.{k}.data" for k in kept if k not in (base, chain.diff_ident)]
        + ([f"vda.diff.{chain.diff_ident}.data"] if chain.diff_ident in kept else [])
    )
    meta = read_meta(str(folder / "vda.full.data"))
    assert (meta.checkpoint_name, meta.parent_checkpoint, meta.incremental) == (base, "", False)
    assert meta.compressed == (2 if chain.compress else False)
    assert not (folder / ".virtnbdprune").exists()
    dates = {f"{I}2": "2026-11-04", f"{I}4": "2026-11-06", f"{I}5": "2026-11-07"}
    assert read_meta(str(folder / "vda.full.data")).date.startswith(dates.get(base, "2026-11-08"))
    merged = [k for k, (a, _r) in want.items() if a == "merge"]
    assert json.loads((folder / "virtnbdprune.json").read_text()) == {"merged": sorted(merged)}
    assert sorted(p.stem for p in (folder / "checkpoints").glob("*.xml")) == sorted(
        k for k in kept if k != chain.diff_ident
    )
    assert "<parent>" not in (folder / "checkpoints" / f"{base}.xml").read_text()
    links = [k for k in kept if k != chain.diff_ident]
    for before, after in itertools.pairwise(links):  # merged incs build on the link before
        assert read_meta(str(folder / f"vda.inc.{after}.data")).parent_checkpoint == before
        xml = (folder / "checkpoints" / f"{after}.xml").read_text()
        assert f"<parent><name>{before}</name></parent>" in xml.replace(" ", "").replace("\n", "")
    for gone in merged:
        assert not (folder / f"vmconfig.{gone}.xml").exists()
        assert not (folder / f"vda.{gone}.qcow.json").exists()
    assert (folder / f"vmconfig.{base}.xml").is_file()
    manifests = manifests_match(folder)
    assert sorted(manifests) == sorted(kept)
    assert manifests[base]["level"] == "full" and "vda.full.data" in manifests[base]["files"]
    check = run_tool("virtnbdrestore", "-i", folder, "-o", "verify")
    assert check.returncode == 0, check.stderr
    restores_identical(chain, folder, tmp_path, kept)
    again = prune(folder, *args)  # a second run finds nothing more to do
    assert again.returncode == 0 and "merge" not in again.stdout


def test_a_damaged_file_stops_the_merge_and_changes_nothing(chain: Chain, tmp_path: Path) -> None:
    folder = detached_copy(chain, tmp_path / "set")
    victim = folder / f"vda.inc.{I}2.data"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x20
    victim.write_bytes(raw)
    before = snapshot(folder)
    proc = prune(folder, "--keep-last", "2")
    assert proc.returncode == 1
    # A small file's damage also changes its fingerprint: its .zeros side file
    # no longer matches, which stops the merge before the checksum is summed.
    assert (
        f"{victim}: Adler-32" in proc.stderr and "nothing was merged" in proc.stderr
    ) or f"{victim}.zeros does not belong to" in proc.stderr
    # Only the damaged file's extent index may be rebuilt (any reader does that).
    assert {k: v for k, v in snapshot(folder).items() if not k.endswith(".idx")} == {
        k: v for k, v in before.items() if not k.endswith(".idx")
    }
    assert not (folder / ".virtnbdprune").exists()


def kill_at(step: str, folder: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a prune in a child that SIGKILLs itself when it reaches ``step``."""
    code = (
        "import os, signal, sys\n"
        "from libvirtnbdbackup.cli.prune import build_parser, rules_of\n"
        "from libvirtnbdbackup.jobs.prune import prune\n"
        "step, folder, *argv = sys.argv[1:]\n"
        "args = build_parser().parse_args(['-i', folder, *argv])\n"
        "def hook(name):\n"
        "    print(name, flush=True)\n"
        "    if name == step:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "prune(folder, rules_of(args), on_step=hook)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, step, str(folder), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigkill_at_each_step_of_a_merge_loses_nothing(chain: Chain, tmp_path: Path) -> None:
    if chain.compress:
        pytest.skip("the steps do not depend on compression; checked on the plain chain")
    args, expected = RULE_SETS[3]  # both kinds of merge
    kept = [k for k, (a, _r) in expected_rows(chain, expected).items() if a == "keep"]
    trial = detached_copy(chain, tmp_path / "trial", 3)
    steps = kill_at("none", trial, args).stdout.splitlines()
    assert steps[0] == "written vda.full.data" and steps[-1] == "done"
    retired = [s for s in steps if s.startswith("retired")]
    installed = [s for s in steps if s.startswith("installed")]
    chosen = [
        "written vda.full.data",
        f"written vda.inc.{I}7.data",
        f"verified vda.inc.{I}7.data",
        "journal",
        retired[0],
        retired[len(retired) // 2],
        retired[-1],
        installed[0],
        installed[-1],
        "metadata",
        "checkpoints",
    ]
    reference = snapshot(trial)
    for n, step in enumerate(chosen):
        folder = detached_copy(chain, tmp_path / f"kill{n}", 3)
        proc = kill_at(step, folder, args)
        assert proc.returncode == -9, (step, proc.stderr)
        finish = prune(folder, *args)
        assert finish.returncode == 0, (step, finish.stderr)
        assert not (folder / ".virtnbdprune").exists()
        state = snapshot(folder)
        assert {k: v[0] for k, v in state.items() if "lock" not in k} == {
            k: v[0] for k, v in reference.items() if "lock" not in k
        }, step
        if n in (3, 6, 8):  # spot restores: data moved at these steps
            restores_identical(chain, folder, tmp_path / f"r{n}", [kept[0], kept[-1]])


def test_a_prune_racing_a_backup_is_refused(chain: Chain, tmp_path: Path) -> None:
    if chain.compress:
        pytest.skip("checked on the plain chain")
    folder = detached_copy(chain, tmp_path / "set")
    before = snapshot(folder)
    # The lock a backup into this folder holds while it writes (cli/backup.py's own).
    opts = BackupOptions(domain=chain.vm.name, level="inc", output=str(folder))
    lock = lock_backup_folder(opts, "inc")
    try:
        proc = prune(folder, "--keep-last", "2")
    finally:
        lock.release()
    assert proc.returncode == 1
    assert f"{folder} is in use by virtnbdbackup -l inc of domain {chain.vm.name}" in proc.stderr
    assert snapshot(folder) == before
    assert prune(folder, "--keep-last", "2").returncode == 0  # once the backup is done


def test_a_root_of_month_folders(chain: Chain, tmp_path: Path) -> None:
    """/backup/vm/2026-10 and /backup/vm/2026-11: the rules count over both; a
    folder none of whose points is kept goes, the other is merged."""
    if chain.compress:
        pytest.skip("checked on the plain chain")
    root = tmp_path / "vm"
    october = detached_copy(chain, root / "2026-10")
    november = detached_copy(chain, root / "2026-11")
    number = 0
    for level, when, _writes in SCHEDULE:  # October's chain: the same, a month earlier
        ident = chain.diff_ident if level == "diff" else f"{I}{number}"
        set_point_date(october, ident, when.replace(month=10))
        number += level != "diff"
    proc = prune(root, "--dry-run", "--keep-monthly", "2", "--keep-last", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [re.split(r"\s{2,}", line.strip()) for line in proc.stdout.strip().splitlines()[1:]]
    october_rows = {cells[1]: cells[4] for cells in lines if cells[0] == "2026-10"}
    november_rows = {cells[1]: cells[4] for cells in lines if cells[0] == "2026-11"}
    # October's newest point (.7 on 10-09) is the newest of its month: kept, and
    # the chain's end keeps it; November keeps .6 and .7 (last 2, .7 monthly too).
    assert october_rows[f"{I}7"] == "keep" and october_rows[f"{I}6"] == "merge"
    assert november_rows[f"{I}6"] == "keep" and november_rows[f"{I}5"] == "merge"
    assert prune(root, "--keep-last", "2").returncode == 0
    assert not list(october.glob("*.data")) and not list(october.glob("*.cpt"))
    assert sorted(p.name for p in november.glob("*.data")) == [
        "vda.full.data",
        f"vda.inc.{I}7.data",
    ]
    restores_identical(chain, november, tmp_path / "r", [f"{I}6", f"{I}7"])


def test_next_inc_after_a_merge_continues_the_chain(chain: Chain, tmp_path: Path) -> None:
    """On the live folder (run last: it changes the VM's checkpoints)."""
    vm, folder = chain.vm, chain.folder
    assert vm.checkpoints() == [f"{I}{n}" for n in range(8)]
    # A new full at .2 (.0 and .1 deleted in libvirt as roots) and .3-.6
    # merged into .7 (deleted between two kept ones: libvirt folds their
    # bitmaps into .2's); .7's bitmap, the one that is recording, is untouched.
    (folder / f"{I}2.protect").touch()
    proc = prune(folder, "--keep-last", "1")
    assert proc.returncode == 0, proc.stderr
    assert vm.checkpoints() == [f"{I}2", f"{I}7"]
    assert json.loads((folder / f"{vm.name}.cpt").read_text()) == [f"{I}{n}" for n in range(8)]
    reference = tmp_path / "reference.qcow2"
    shutil.copyfile(chain.references[f"{I}7"], reference)
    hmp_io(vm, "vda", "write -P 0x99 700M 2M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 700M 2M", reference)
    log = backup_ok(vm, folder, "auto", *(["-z"] if chain.compress else []))
    assert "full backup" not in log.lower() or "inc" in log.lower()
    inc = read_meta(str(folder / f"vda.inc.{I}8.data"))
    assert (inc.checkpoint_name, inc.parent_checkpoint) == (f"{I}8", f"{I}7")
    assert vm.checkpoints() == [f"{I}2", f"{I}7", f"{I}8"]
    latest = restore_image(folder, tmp_path / "latest")
    assert images_identical(reference, latest)
    for point in (f"{I}2", f"{I}7"):
        at = restore_image(folder, tmp_path / f"at-{point}", "--until", point)
        assert images_identical(chain.references[point], at), point


def test_a_raw_disk_saved_with_the_full_survives_its_merge(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """A raw disk has no bitmap: the full (-l full --raw) saves it as an image,
    which is that disk's only copy; merging the full away must keep it."""
    vm = create_vm(
        conn,
        [
            DiskSpec("vda", 256 * 1024**2, writes=["write -P 0x31 0 1M"]),
            DiskSpec("vdc", 64 * 1024**2, fmt="raw", writes=["write -P 0x32 1M 1M"]),
        ],
        cdrom=False,
    )
    try:
        out = tmp_path / "set"
        backup_ok(vm, out, "full", "--raw")
        raw_copy = out / "vdc.copy.data"
        digest = hashlib.sha256(raw_copy.read_bytes()).hexdigest()
        for n in (1, 2):
            hmp_io(vm, "vda", f"write -P 0x4{n} {n}M 1M")
            backup_ok(vm, out, "inc")
        proc = prune(out, "--keep-last", "1")
        assert proc.returncode == 0, proc.stderr
        assert read_meta(str(out / "vda.full.data")).checkpoint_name == f"{I}2"
        assert hashlib.sha256(raw_copy.read_bytes()).hexdigest() == digest
    finally:
        remove_vm(vm)
