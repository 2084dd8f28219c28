"""The job ledger of a fleet: ROOT/virtnbdfleet.sqlite, beside the backups.

One row per run in ``runs`` and one per VM (or per hypervisor that could
not be listed, with ``vm = ''``) in ``jobs``. A job row is written when the
job starts (state ``running``) and completed when it ends, so a run killed
hard leaves rows that say so. Times are Unix epochs (UTC).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TargetError
from .private import create_private

LEDGER_NAME = "virtnbdfleet.sqlite"
SCHEMA_VERSION = 2

# ok: exit 0; warning: exit 2 (warnings logged); failed: any other exit, or
# the job could not start; interrupted: stopped by SIGINT/SIGTERM mid-way;
# cancelled: not started because the run was stopped.
GOOD_STATES = ("ok", "warning")
FAILED_STATES = ("failed", "interrupted", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    pid INTEGER NOT NULL,
    node TEXT NOT NULL,
    argv TEXT NOT NULL,
    jobs_limit INTEGER NOT NULL,
    peak_rss_kib INTEGER,
    message TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    hypervisor TEXT NOT NULL,
    uri TEXT NOT NULL,
    vm TEXT NOT NULL,
    uuid TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    folder TEXT,
    period TEXT,
    level TEXT,
    state TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    duration REAL,
    bytes INTEGER,
    set_bytes INTEGER,
    throughput REAL,
    exit_code INTEGER,
    message TEXT,
    log TEXT,
    nbd_port INTEGER,
    prune_state TEXT,
    prune_message TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_vm ON jobs (hypervisor, vm, id);
"""


@dataclass(frozen=True)
class JobRow:
    id: int
    run_id: int
    hypervisor: str
    uri: str
    vm: str
    uuid: str | None
    tags: tuple[str, ...]
    folder: str | None
    period: str | None
    level: str | None
    state: str
    started: float
    ended: float | None
    duration: float | None
    bytes: int | None
    set_bytes: int | None
    throughput: float | None
    exit_code: int | None
    message: str | None
    log: str | None
    nbd_port: int | None
    prune_state: str | None  # ok, warning, failed, interrupted; None: no retention ran
    prune_message: str | None

    @property
    def good(self) -> bool:
        return self.state in GOOD_STATES

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["tags"] = list(self.tags)
        return out


@dataclass(frozen=True)
class RunRow:
    id: int
    started: float
    ended: float | None
    state: str
    exit_code: int | None
    pid: int
    node: str
    argv: list[str]
    jobs_limit: int
    peak_rss_kib: int | None
    message: str | None


JOB_COLUMNS = [f.name for f in JobRow.__dataclass_fields__.values()]


def _job(row: sqlite3.Row) -> JobRow:
    values = dict(row)
    values["tags"] = tuple(json.loads(values["tags"] or "[]"))
    return JobRow(**values)


class Ledger:
    """The ledger of the fleet under ``root``; created on first use."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.path = root / LEDGER_NAME
        if not create and not self.path.is_file():
            raise TargetError(
                f"{root} holds no fleet ledger ({LEDGER_NAME}): run virtnbdfleet backup "
                "with this -o first"
            )
        try:
            if create:
                create_private(self.path)  # SQLite gives its journal the same mode
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            if self._version() != SCHEMA_VERSION:
                self._upgrade()
        except (sqlite3.Error, OSError) as err:
            raise TargetError(f"cannot use the fleet ledger {self.path}: {err}") from None

    def _version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise TargetError(
                f"{self.path} was written by a newer virtnbdfleet (schema {version}); "
                "update this one"
            )
        return version

    def _upgrade(self) -> None:
        """Create the tables, or add what a ledger of an older version lacks."""
        with self._transaction():  # one process at a time; the others then see it done
            version = self._version()
            if version == 0:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            elif version == 1:  # the first release had no retention columns
                self._db.execute("ALTER TABLE jobs ADD COLUMN prune_state TEXT")
                self._db.execute("ALTER TABLE jobs ADD COLUMN prune_message TEXT")
            if version != SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> Any:
        return _Transaction(self._db)

    def _write(self, sql: str, args: Sequence[Any]) -> int:
        try:
            with self._transaction():
                cursor = self._db.execute(sql, args)
        except sqlite3.Error as err:
            raise TargetError(f"cannot write the fleet ledger {self.path}: {err}") from None
        return int(cursor.lastrowid or 0)

    # ---- runs

    def start_run(self, started: float, argv: list[str], jobs_limit: int) -> int:
        return self._write(
            "INSERT INTO runs (started, state, pid, node, argv, jobs_limit) "
            "VALUES (?, 'running', ?, ?, ?, ?)",
            (started, os.getpid(), socket.gethostname(), json.dumps(argv), jobs_limit),
        )

    def end_run(
        self, run_id: int, ended: float, state: str, exit_code: int, peak_rss_kib: int, msg: str
    ) -> None:
        self._write(
            "UPDATE runs SET ended = ?, state = ?, exit_code = ?, peak_rss_kib = ?, message = ? "
            "WHERE id = ?",
            (ended, state, exit_code, peak_rss_kib, msg, run_id),
        )

    def runs(self) -> list[RunRow]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY id").fetchall()
        out = []
        for row in rows:
            values = dict(row)
            values["argv"] = json.loads(values["argv"])
            out.append(RunRow(**values))
        return out

    # ---- jobs

    def start_job(self, run_id: int, started: float, **values: Any) -> int:
        values = {**values, "run_id": run_id, "started": started}
        values.setdefault("state", "running")
        if "tags" in values:
            values["tags"] = json.dumps(list(values["tags"]))
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        return self._write(f"INSERT INTO jobs ({names}) VALUES ({marks})", list(values.values()))

    def update_job(self, job_id: int, **values: Any) -> None:
        unknown = set(values) - set(JOB_COLUMNS)
        assert not unknown, unknown
        sets = ", ".join(f"{name} = ?" for name in values)
        self._write(f"UPDATE jobs SET {sets} WHERE id = ?", [*values.values(), job_id])

    def jobs(self, run_id: int | None = None) -> list[JobRow]:
        if run_id is None:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE run_id = ? ORDER BY id", (run_id,)
            ).fetchall()
        return [_job(r) for r in rows]

    def jobs_by_vm(self) -> Iterator[tuple[tuple[str, str], list[JobRow]]]:
        """Each (hypervisor, vm) with its rows, oldest first."""
        grouped: dict[tuple[str, str], list[JobRow]] = {}
        for job in self.jobs():
            grouped.setdefault((job.hypervisor, job.vm), []).append(job)
        yield from sorted(grouped.items())

    def run_alive(self, run_id: int) -> bool:
        """Whether the process of run ``run_id`` still runs (on this machine)."""
        row = self._db.execute(
            "SELECT pid, node, state FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None or row["state"] != "running":
            return False
        if row["node"] != socket.gethostname():
            return True  # another machine's run: cannot tell, assume it runs
        return _pid_alive(int(row["pid"]))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time,
    also across fleet processes sharing the ledger."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
