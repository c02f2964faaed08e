"""When jobs are due, run history, journal and locks (real SQLite and flock, no btrfs)."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from freezegun import freeze_time

from gfs_backup.actions.run import JobOutcome, exit_code, next_due
from gfs_backup.cli.progress import TerminalProgress
from gfs_backup.core.config import Job
from gfs_backup.core.errors import ExitCode
from gfs_backup.core.lock import LockHeld, job_lock
from gfs_backup.core.policy import load_policy_file, shipped_policy_paths
from gfs_backup.core.state import State
from gfs_backup.core.timeutil import resolve_zone

pytestmark = pytest.mark.integration


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


@pytest.fixture
def job() -> Job:
    policy = load_policy_file(shipped_policy_paths()["classic-gfs"])  # Mon..Sat 01:00
    policy = replace(policy, zone=resolve_zone("UTC"), timezone="UTC")
    return Job("web", "files", "local", "usb", policy, {"path": "/srv"})


def succeed(state: State, job: str, when: str) -> None:
    with freeze_time(when):
        run = state.start_run(job)
        state.finish_run(run, "ok")


def test_never_run_is_due_now(tmp_path: Path, job: Job) -> None:
    state = State(tmp_path)
    now = utc("2026-11-24T12:00:00")
    assert next_due(job, state, tmp_path / "none", now) == now


def test_missed_runs_are_caught_up_once(tmp_path: Path, job: Job) -> None:
    state = State(tmp_path)
    succeed(state, "web", "2026-11-16T01:00:00Z")  # Monday; then the host was off 4 days
    now = utc("2026-11-20T09:00:00")
    assert next_due(job, state, tmp_path, now) == utc("2026-11-17T01:00:00")  # due: once
    succeed(state, "web", "2026-11-20T09:00:00Z")  # the catch-up run
    assert next_due(job, state, tmp_path, now) == utc("2026-11-21T01:00:00")


def test_failed_runs_do_not_count_as_success(tmp_path: Path, job: Job) -> None:
    state = State(tmp_path)
    succeed(state, "web", "2026-11-16T01:00:00Z")
    with freeze_time("2026-11-17T01:00:00Z"):
        state.finish_run(state.start_run("web"), "failed", message="target full")
    assert next_due(job, state, tmp_path, utc("2026-11-17T02:00:00")) == utc("2026-11-17T01:00:00")
    assert [r.status for r in state.runs("web")] == ["failed", "ok"]


def test_interrupted_runs_and_open_journal(tmp_path: Path) -> None:
    state = State(tmp_path)
    killed = state.start_run("web")
    entry = state.journal(killed, "web", "snapshot", "/srv/.gfs-snapshots/gfs-web-x")
    later = state.start_run("web")
    assert state.mark_interrupted("web", except_run=later) == 1
    assert [e.id for e in state.open_entries("web")] == [entry]
    state.done(entry)
    assert state.open_entries("web") == []
    assert state.snapshot_paths("web") == {"/srv/.gfs-snapshots/gfs-web-x"}
    assert state.runs("web")[1].status == "interrupted"


def test_read_only_state_writes_nothing(tmp_path: Path) -> None:
    assert State.read_only(tmp_path / "absent") is None
    assert not (tmp_path / "absent").exists()


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with job_lock(tmp_path, "web", wait=False):
        with (
            pytest.raises(LockHeld, match="another gfs run holds its lock"),
            job_lock(tmp_path, "web", wait=False),
        ):
            pass
        with job_lock(tmp_path, "db", wait=False):  # other jobs are independent
            pass
    with job_lock(tmp_path, "web", wait=False):
        pass


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        (["ok", "not-due"], ExitCode.OK),
        (["ok", "failed"], ExitCode.PARTIAL),
        (["failed", "failed"], ExitCode.FAILED),
        (["ok", "locked"], ExitCode.LOCKED),
        (["failed", "locked"], ExitCode.FAILED),
    ],
)
def test_exit_codes(statuses: list[str], code: ExitCode) -> None:
    assert exit_code([JobOutcome(f"j{i}", s) for i, s in enumerate(statuses)]) == code


def test_progress_line_shows_bytes_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    clock = iter([0.0, 2.0, 2.1, 4.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    progress = TerminalProgress("web: export", total=400 << 20)
    progress(100 << 20)  # at 2 s: 100 MiB, 50 MiB/s, 300 MiB left = 6 s
    progress(1)  # 0.1 s later: not redrawn
    progress(100 << 20)
    text = err.getvalue()
    assert "web: export: 100.0 MiB at 50.0 MiB/s, 25%, ETA 0:06" in text
    assert text.count("\r") == 2
