"""Run history and the journal of mutating steps, in SQLite under the state directory.

The journal is written *before* each mutation (intent) and closed after it, so a run
killed at any point leaves open entries that the next run finishes or undoes.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from gfs_backup.core.errors import ExitCode, GfsError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL DEFAULT 'running',
    generation TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    message TEXT
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, id);
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    job TEXT NOT NULL,
    action TEXT NOT NULL,
    path TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    done_at TEXT
);
CREATE INDEX IF NOT EXISTS journal_open ON journal (job, done_at);
"""


class StateError(GfsError):
    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class RunRecord:
    id: int
    job: str
    started_at: datetime
    finished_at: datetime | None
    status: str  # running | ok | failed | interrupted | restored | drilled | drill-failed
    generation: str | None
    bytes: int
    seconds: float | None
    message: str | None


@dataclass(frozen=True)
class JournalEntry:
    id: int
    run_id: int
    job: str
    action: str  # snapshot | partial | prune
    path: str
    detail: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class State:
    """The state database; one connection, every write committed at once (autocommit)."""

    def __init__(self, state_dir: Path) -> None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.db = sqlite3.connect(state_dir / "gfs.sqlite", isolation_level=None, timeout=30)
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"state directory {state_dir}: {exc}") from None

    @classmethod
    def read_only(cls, state_dir: Path) -> State | None:
        """Open an existing database without writing anything (dry-run); None if absent."""
        path = state_dir / "gfs.sqlite"
        if not path.exists():
            return None
        state = cls.__new__(cls)
        try:
            state.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise StateError(f"state database {path}: {exc}") from None
        return state

    def close(self) -> None:
        self.db.close()

    def start_run(self, job: str) -> int:
        cursor = self.db.execute("INSERT INTO runs (job, started_at) VALUES (?, ?)", (job, _now()))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def finish_run(
        self,
        run_id: int,
        status: str,
        generation: str | None = None,
        size: int = 0,
        seconds: float | None = None,
        message: str | None = None,
    ) -> None:
        self.db.execute(
            "UPDATE runs SET finished_at = ?, status = ?, generation = ?, bytes = ?, "
            "seconds = ?, message = ? WHERE id = ?",
            (_now(), status, generation, size, seconds, message, run_id),
        )

    def mark_interrupted(self, job: str, except_run: int) -> int:
        """Runs of `job` left 'running' by a killed process become 'interrupted'."""
        cursor = self.db.execute(
            "UPDATE runs SET status = 'interrupted', finished_at = ? "
            "WHERE job = ? AND status = 'running' AND id != ?",
            (_now(), job, except_run),
        )
        return cursor.rowcount

    def journal(self, run_id: int, job: str, action: str, path: str, detail: str = "") -> int:
        cursor = self.db.execute(
            "INSERT INTO journal (run_id, job, action, path, detail, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, job, action, path, detail, _now()),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def done(self, entry_id: int) -> None:
        self.db.execute("UPDATE journal SET done_at = ? WHERE id = ?", (_now(), entry_id))

    def open_entries(self, job: str) -> list[JournalEntry]:
        rows = self.db.execute(
            "SELECT id, run_id, job, action, path, detail FROM journal "
            "WHERE job = ? AND done_at IS NULL ORDER BY id",
            (job,),
        ).fetchall()
        return [JournalEntry(*row) for row in rows]

    def snapshot_paths(self, job: str) -> set[str]:
        """Every snapshot path gfs ever journaled for `job` (how gfs knows its own)."""
        rows = self.db.execute(
            "SELECT path FROM journal WHERE job = ? AND action = 'snapshot'", (job,)
        ).fetchall()
        return {row[0] for row in rows}

    def runs(self, job: str, limit: int = 20) -> list[RunRecord]:
        rows = self.db.execute(
            "SELECT id, job, started_at, finished_at, status, generation, bytes, seconds, "
            "message FROM runs WHERE job = ? ORDER BY id DESC LIMIT ?",
            (job, limit),
        ).fetchall()
        return [_run(row) for row in rows]

    def last_success(self, job: str) -> RunRecord | None:
        row = self.db.execute(
            "SELECT id, job, started_at, finished_at, status, generation, bytes, seconds, "
            "message FROM runs WHERE job = ? AND status = 'ok' ORDER BY id DESC LIMIT 1",
            (job,),
        ).fetchone()
        return _run(row) if row else None

    def last_drill(self, job: str) -> RunRecord | None:
        """The job's newest finished drill (status drilled or drill-failed)."""
        row = self.db.execute(
            "SELECT id, job, started_at, finished_at, status, generation, bytes, seconds, "
            "message FROM runs WHERE job = ? AND status IN ('drilled', 'drill-failed') "
            "ORDER BY id DESC LIMIT 1",
            (job,),
        ).fetchone()
        return _run(row) if row else None


def _run(row: tuple[object, ...]) -> RunRecord:
    def stamp(value: object) -> datetime | None:
        return datetime.fromisoformat(str(value)) if value else None

    started = stamp(row[2])
    assert started is not None
    return RunRecord(
        int(str(row[0])),
        str(row[1]),
        started,
        stamp(row[3]),
        str(row[4]),
        None if row[5] is None else str(row[5]),
        int(str(row[6])),
        None if row[7] is None else float(str(row[7])),
        None if row[8] is None else str(row[8]),
    )
