"""Calendar expressions: parsing, next run, DST edges."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gfs_backup.core.schedule import parse_schedule

pytestmark = pytest.mark.unit

BRUSSELS = ZoneInfo("Europe/Brussels")


def runs(expression: str, start: datetime, count: int) -> list[str]:
    schedule = parse_schedule(expression)
    result = []
    when: datetime | None = start
    for _ in range(count):
        assert when is not None
        when = schedule.next_after(when, BRUSSELS)
        assert when is not None
        result.append(when.isoformat())
    return result


def test_monday_to_saturday_skips_sunday() -> None:
    start = datetime(2026, 11, 27, 12, 0, tzinfo=BRUSSELS)  # Friday noon
    assert runs("Mon..Sat *-*-* 01:00", start, 3) == [
        "2026-11-28T01:00:00+01:00",
        "2026-11-30T01:00:00+01:00",
        "2026-12-01T01:00:00+01:00",
    ]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("daily", "2026-11-24T00:00:00+01:00"),
        ("hourly", "2026-11-23T13:00:00+01:00"),
        ("weekly", "2026-11-30T00:00:00+01:00"),
        ("monthly", "2026-12-01T00:00:00+01:00"),
        ("yearly", "2027-01-01T00:00:00+01:00"),
        ("*-*-01..07 06:00", "2026-12-01T06:00:00+01:00"),
        ("Sun *-*-01..07 06:00", "2026-12-06T06:00:00+01:00"),
        ("*:0/15", "2026-11-23T12:45:00+01:00"),
        ("12-24 18:00", "2026-12-24T18:00:00+01:00"),
        ("Fri,Sat 23:30:15", "2026-11-27T23:30:15+01:00"),
    ],
)
def test_next_run(expression: str, expected: str) -> None:
    start = datetime(2026, 11, 23, 12, 30, tzinfo=BRUSSELS)  # a Monday
    assert runs(expression, start, 1) == [expected]


def test_time_skipped_by_spring_forward_does_not_fire() -> None:
    start = datetime(2026, 3, 28, 12, 0, tzinfo=BRUSSELS)
    assert runs("*-*-* 02:30", start, 2) == [
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_repeated_hour_of_fall_back_fires_once() -> None:
    start = datetime(2026, 10, 24, 12, 0, tzinfo=BRUSSELS)
    assert runs("*-*-* 02:30", start, 2) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]


def test_feb_29_is_found_years_ahead() -> None:
    start = datetime(2025, 3, 1, tzinfo=BRUSSELS)
    assert runs("*-02-29 00:00", start, 1) == ["2028-02-29T00:00:00+01:00"]


def test_impossible_date_never_fires() -> None:
    schedule = parse_schedule("*-02-30 00:00")
    assert schedule.next_after(datetime(2026, 1, 1, tzinfo=BRUSSELS), BRUSSELS) is None


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("", "cannot read calendar expression"),
        ("Funday 01:00", "unknown weekday 'funday'"),
        ("Sat..Mon", "runs backwards"),
        ("*-*-* 25:00", "hour '25'"),
        ("*-13-* 00:00", "month '13'"),
        ("*-*-* 1:2:3:4", "time '1:2:3:4'"),
        ("daily please", "unknown weekday .daily."),
        ("*-*-* x:00", "invalid hour 'x'"),
    ],
)
def test_bad_expressions_say_what_is_wrong(expression: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_schedule(expression)
