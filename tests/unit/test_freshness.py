"""The freshness rules of `gfs status --check`: defaults from the schedule, the summary
state and line (judging real targets: tests/system/test_operations.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from gfs_backup.actions.freshness import (
    CRITICAL,
    OK,
    UNKNOWN,
    WARNING,
    Freshness,
    Limits,
    check_line,
    human,
    longest_gap,
    worst,
)
from gfs_backup.core.schedule import parse_schedule

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("schedule", "gap"),
    [
        ("*-*-* 02:00", 86400),
        ("Mon..Sat 01:00", 2 * 86400),  # Saturday to Monday
        ("*-*-* 00,12:00", 12 * 3600),
        ("*-*-01 03:00", 31 * 86400),  # the longest month
    ],
)
def test_the_default_max_age_follows_the_longest_gap_of_the_schedule(
    schedule: str, gap: int
) -> None:
    assert longest_gap(parse_schedule(schedule), timezone.utc, NOW) == gap


def test_a_schedule_firing_once_has_no_gap() -> None:
    assert longest_gap(parse_schedule("2027-01-01 00:00"), timezone.utc, NOW) is None


def test_critical_outranks_unknown_which_outranks_warning() -> None:
    assert worst(OK, WARNING) == WARNING
    assert worst(WARNING, UNKNOWN) == UNKNOWN
    assert worst(UNKNOWN, CRITICAL, WARNING) == CRITICAL
    assert worst() == OK


def test_the_line_names_every_job_that_is_not_ok_with_perfdata_for_all() -> None:
    limits = Limits(36 * 3600.0, None, None)
    fresh = Freshness("web", newest=NOW.replace(hour=10), limits=limits)
    stale = Freshness("db-01", newest=NOW.replace(day=4), limits=limits)
    stale.raise_to(CRITICAL, "newest backup is 2d old (max_age 1d 12h)")
    stale.raise_to(WARNING, "last run failed: target full")
    assert stale.state == CRITICAL
    code, line = check_line([fresh, stale], NOW)
    assert code == CRITICAL
    assert line == (
        "GFS CRITICAL - 1 critical of 2 job(s): db-01: newest backup is 2d old "
        "(max_age 1d 12h), last run failed: target full | web_age=7200s;129600;259200;0 "
        "'db-01_age'=172800s;129600;259200;0"
    )
    code, line = check_line([fresh], NOW)
    assert (code, line) == (OK, "GFS OK - 1 job(s) fresh | web_age=7200s;129600;259200;0")


def test_a_pipe_in_a_reason_cannot_start_the_perfdata() -> None:
    broken = Freshness("a")
    broken.raise_to(WARNING, "last run failed: a | b")
    code, line = check_line([broken], NOW)
    assert code == WARNING and line.count("|") == 0


def test_problems_make_the_line_unknown_unless_worse() -> None:
    assert check_line([], NOW, ["state database unreadable"])[0] == UNKNOWN


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (600, "10m"), (3660, "1h 1m"), (86400, "1d"), (90000, "1d 1h")],
)
def test_ages_read_like_a_person_says_them(seconds: int, text: str) -> None:
    assert human(seconds) == text
