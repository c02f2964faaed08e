"""Daylight saving time: periods are wall-clock periods of the planning zone.

2024 changes: Europe/Brussels springs forward on Sun Mar 31 at 01:00Z (02:00 CET -> 03:00
CEST) and falls back on Sun Oct 27 at 01:00Z (03:00 CEST -> 02:00 CET); America/New_York
springs forward on Sun Mar 10 at 07:00Z and falls back on Sun Nov 3 at 06:00Z (01:00-02:00
local happens twice). Generations are built from UTC instants so that the expected local
times below can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest

from gfs_backup.retention import (
    Generation,
    KeepWithin,
    Plan,
    RetentionRules,
    Semantics,
    parse_keep_within,
    plan,
)
from tests.unit.plan_results import kept_ids, pruned_ids, reasons

pytestmark = pytest.mark.unit

UTC = timezone.utc
BRUSSELS = ZoneInfo("Europe/Brussels")
NEW_YORK = ZoneInfo("America/New_York")
LATER = datetime(2100, 1, 1, tzinfo=UTC)


def z(text: str) -> datetime:
    """'2024-03-31 01:30' as an aware UTC instant."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def local(text: str, zone: tzinfo) -> datetime:
    """A wall-clock time in `zone` (only for times that exist exactly once)."""
    return datetime.fromisoformat(text).replace(tzinfo=zone)


def every(start: datetime, end: datetime, step: timedelta) -> list[Generation]:
    """Generations from `start` to `end` inclusive; the id is the UTC instant."""
    result = []
    when = start
    while when <= end:
        result.append(Generation(when.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ"), when))
        when += step
    return result


def run(
    generations: Sequence[Generation],
    semantics: Semantics,
    zone: tzinfo,
    now: datetime = LATER,
    within: KeepWithin | None = None,
    **counts: int,
) -> Plan:
    rules = RetentionRules(semantics=semantics, keep_within=within, **counts)
    return plan(generations, rules, now, zone)


HOUR = timedelta(hours=1)
RULE_FAMILIES: list[Semantics] = ["pbs", "borg", "restic"]


# --------------------------------------------------------------------------------------
# Daily buckets over the 23-hour and 25-hour days


def spring_hourly() -> list[Generation]:
    # Every hour at :30 local, Sat Mar 30 00:30 CET (Mar 29 23:30Z) .. Mon Apr 1 23:30 CEST
    # (Apr 1 21:30Z): 24 + 23 + 24 = 71 generations.
    return every(z("2024-03-29 23:30"), z("2024-04-01 21:30"), HOUR)


@pytest.mark.parametrize("semantics", RULE_FAMILIES)
def test_daily_over_the_23_hour_day(semantics: Semantics) -> None:
    generations = spring_hourly()
    assert len(generations) == 71
    result = run(generations, semantics, BRUSSELS, keep_daily=-1)
    # The 23:30 local run of each day: CEST on Apr 1 and Mar 31, CET on Mar 30.
    expected = ["2024-04-01 21:30Z", "2024-03-31 21:30Z", "2024-03-30 22:30Z"]
    if semantics == "restic":
        expected.append("2024-03-29 23:30Z")  # restic keeps the oldest: Mar 30 00:30 CET
    assert kept_ids(result) == expected
    assert len(result.prune) == 71 - len(expected)


def test_daily_in_utc_counts_utc_days() -> None:
    result = run(spring_hourly(), "borg", UTC, keep_daily=-1)
    assert kept_ids(result) == [
        "2024-04-01 21:30Z",
        "2024-03-31 23:30Z",
        "2024-03-30 23:30Z",
        "2024-03-29 23:30Z",
    ]


def test_the_23_hour_day_has_23_hourly_periods() -> None:
    # Every 30 minutes through Mar 31, 00:00 CET (Mar 30 23:00Z) .. 23:30 CEST (21:30Z).
    generations = every(z("2024-03-30 23:00"), z("2024-03-31 21:30"), HOUR / 2)
    assert len(generations) == 46
    for semantics in ("pbs", "borg"):
        result = run(generations, semantics, BRUSSELS, keep_hourly=-1)
        assert len(result.keep) == 23, semantics
        assert all(gen.time.astimezone(BRUSSELS).minute == 0 for gen in result.prune)


def fall_back_hourly(zone: tzinfo) -> list[Generation]:
    # Every hour at :30 local over the whole 25-hour day of the fall-back.
    if zone is BRUSSELS:  # Oct 27 00:30 CEST (Oct 26 22:30Z) .. 23:30 CET (Oct 27 22:30Z)
        return every(z("2024-10-26 22:30"), z("2024-10-27 22:30"), HOUR)
    # Nov 3 00:30 EDT (04:30Z) .. 23:30 EST (Nov 4 04:30Z)
    return every(z("2024-11-03 04:30"), z("2024-11-04 04:30"), HOUR)


# The first of the two instants in the repeated hour (02:30 CEST, 01:30 EDT).
REPEATED_FIRST = {"Europe/Brussels": "2024-10-27 00:30Z", "America/New_York": "2024-11-03 05:30Z"}


@pytest.mark.parametrize("zone", [BRUSSELS, NEW_YORK], ids=str)
@pytest.mark.parametrize("semantics", RULE_FAMILIES)
def test_daily_over_the_25_hour_day(semantics: Semantics, zone: ZoneInfo) -> None:
    generations = fall_back_hourly(zone)
    assert len(generations) == 25
    result = run(generations, semantics, zone, keep_daily=-1)
    expected = [generations[-1].id]  # 23:30 local
    if semantics == "restic":
        expected.append(generations[0].id)  # 00:30 local, as the oldest
    assert kept_ids(result) == expected


@pytest.mark.parametrize("zone", [BRUSSELS, NEW_YORK], ids=str)
@pytest.mark.parametrize("semantics", RULE_FAMILIES)
def test_repeated_hour_is_one_hourly_period(semantics: Semantics, zone: ZoneInfo) -> None:
    result = run(fall_back_hourly(zone), semantics, zone, keep_hourly=-1)
    # 25 instants, 24 wall-clock hours: only the earlier instant of the repeated hour goes.
    assert pruned_ids(result) == [REPEATED_FIRST[zone.key]]
    assert len(result.keep) == 24


def repeated_hour_pair() -> list[Generation]:
    # Brussels: 02:30 CET, 02:30 CEST (same wall-clock second), and the day before.
    return [
        Generation("02:30 CET", z("2024-10-27 01:30")),
        Generation("02:30 CEST", z("2024-10-27 00:30")),
        Generation("day before", z("2024-10-26 12:00")),
    ]


@pytest.mark.parametrize(
    ("semantics", "zone", "counts", "expected"),
    [
        # hourly 2: in Brussels the two 02:30s share an hour, so the second kept is the day before.
        ("pbs", BRUSSELS, {"keep_hourly": 2}, ["02:30 CET", "day before"]),
        ("borg", BRUSSELS, {"keep_hourly": 2}, ["02:30 CET", "day before"]),
        ("restic", BRUSSELS, {"keep_hourly": 2}, ["02:30 CET", "day before"]),
        ("pbs", UTC, {"keep_hourly": 2}, ["02:30 CET", "02:30 CEST"]),
        ("borg", UTC, {"keep_hourly": 2}, ["02:30 CET", "02:30 CEST"]),
        ("restic", UTC, {"keep_hourly": 2}, ["02:30 CET", "02:30 CEST"]),
        # borg's keep-last is one per local second: the two 02:30:00 collapse in Brussels.
        ("borg", BRUSSELS, {"keep_last": 2}, ["02:30 CET", "day before"]),
        ("borg", UTC, {"keep_last": 2}, ["02:30 CET", "02:30 CEST"]),
        ("restic", BRUSSELS, {"keep_last": 2}, ["02:30 CET", "02:30 CEST"]),
        ("pbs", BRUSSELS, {"keep_last": 2}, ["02:30 CET", "02:30 CEST"]),
    ],
)
def test_the_repeated_hour(
    semantics: Semantics, zone: tzinfo, counts: dict[str, int], expected: list[str]
) -> None:
    assert kept_ids(run(repeated_hour_pair(), semantics, zone, **counts)) == expected


def test_gfs_son_of_the_25_hour_day_is_its_first_run() -> None:
    generations = fall_back_hourly(BRUSSELS)
    result = run(generations, "gfs", BRUSSELS, sons=-1)
    assert reasons(result) == {
        "2024-10-27 22:30Z": ("newest",),
        "2024-10-26 22:30Z": ("son",),  # 00:30 CEST
    }


# --------------------------------------------------------------------------------------
# Runs at 00:30 local across the change


def twice_daily_over_spring() -> list[Generation]:
    # 00:30 and 12:30 local, Fri Mar 29 .. Tue Apr 2, Brussels (ids are UTC).
    stamps = [
        "2024-03-28 23:30",  # Mar 29 00:30 CET
        "2024-03-29 11:30",  # Mar 29 12:30 CET
        "2024-03-29 23:30",  # Mar 30 00:30 CET
        "2024-03-30 11:30",  # Mar 30 12:30 CET
        "2024-03-30 23:30",  # Mar 31 00:30 CET
        "2024-03-31 10:30",  # Mar 31 12:30 CEST
        "2024-03-31 22:30",  # Apr 1 00:30 CEST
        "2024-04-01 10:30",  # Apr 1 12:30 CEST
        "2024-04-01 22:30",  # Apr 2 00:30 CEST
        "2024-04-02 10:30",  # Apr 2 12:30 CEST
    ]
    return [Generation(f"{stamp}Z", z(stamp)) for stamp in stamps]


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        # Local days: the 12:30 run of each day.
        (
            BRUSSELS,
            [
                "2024-04-02 10:30Z",
                "2024-04-01 10:30Z",
                "2024-03-31 10:30Z",
                "2024-03-30 11:30Z",
                "2024-03-29 11:30Z",
            ],
        ),
        # UTC days: a 00:30 local run is the last of the previous UTC day.
        (
            UTC,
            [
                "2024-04-02 10:30Z",
                "2024-04-01 22:30Z",
                "2024-03-31 22:30Z",
                "2024-03-30 23:30Z",
                "2024-03-29 23:30Z",
                "2024-03-28 23:30Z",
            ],
        ),
    ],
    ids=["Brussels", "UTC"],
)
def test_runs_at_half_past_midnight_count_in_the_local_day(
    zone: tzinfo, expected: list[str]
) -> None:
    result = run(twice_daily_over_spring(), "borg", zone, keep_daily=-1)
    assert kept_ids(result) == expected


def test_gfs_fathers_are_local_mondays_across_fall_back() -> None:
    # Daily at 00:30 local, Mon Oct 21 .. Mon Oct 28 2024 in Brussels.
    generations = [
        Generation(f"Oct {day}", local(f"2024-10-{day} 00:30", BRUSSELS)) for day in range(21, 29)
    ]
    assert generations[-1].time.utcoffset() == timedelta(hours=1)  # CET after the change
    rules = {"sons": -1, "fathers": -1}
    brussels = run(generations, "gfs", BRUSSELS, **rules)
    fathers = [kept.generation.id for kept in brussels.keep if "father" in kept.labels]
    assert fathers == ["Oct 28", "Oct 21"]
    # In UTC each run falls on the previous day: Oct 21's run is Sun Oct 20 22:30Z and is the
    # first of UTC week Oct 14-20; Oct 22's run is Mon Oct 21 22:30Z, first of the next week.
    utc = run(generations, "gfs", UTC, **rules)
    fathers = [kept.generation.id for kept in utc.keep if "father" in kept.labels]
    assert fathers == ["Oct 22", "Oct 21"]


# --------------------------------------------------------------------------------------
# Weekly and monthly across month ends


def test_weekly_monday_half_past_midnight() -> None:
    # Sun 12:00 and Mon 00:30 local, Brussels, two weeks of November 2024 (CET).
    generations = [
        Generation("Mon Nov 11 00:30", local("2024-11-11 00:30", BRUSSELS)),
        Generation("Sun Nov 10 12:00", local("2024-11-10 12:00", BRUSSELS)),
        Generation("Mon Nov 4 00:30", local("2024-11-04 00:30", BRUSSELS)),
        Generation("Sun Nov 3 12:00", local("2024-11-03 12:00", BRUSSELS)),
    ]
    for semantics in ("pbs", "borg"):
        # ISO weeks in Brussels: W46 {Nov 11}, W45 {Nov 4, Nov 10}, W44 {Nov 3}.
        brussels = run(generations, semantics, BRUSSELS, keep_weekly=-1)
        assert pruned_ids(brussels) == ["Mon Nov 4 00:30"], semantics
        # In UTC the Monday runs are Sunday 23:30Z:
        # W45 {Nov 10, Nov 11 run}, W44 {Nov 3, Nov 4 run}.
        utc = run(generations, semantics, UTC, keep_weekly=-1)
        assert pruned_ids(utc) == ["Sun Nov 10 12:00", "Sun Nov 3 12:00"], semantics


def test_monthly_runs_on_the_first_at_half_past_midnight() -> None:
    # 00:30 local on the 1st and 15th, Brussels: Oct 1 is CEST, Nov and Dec are CET.
    generations = [
        Generation("Dec 1", local("2024-12-01 00:30", BRUSSELS)),  # Nov 30 23:30Z
        Generation("Nov 15", local("2024-11-15 00:30", BRUSSELS)),  # Nov 14 23:30Z
        Generation("Nov 1", local("2024-11-01 00:30", BRUSSELS)),  # Oct 31 23:30Z
        Generation("Oct 15", local("2024-10-15 00:30", BRUSSELS)),  # Oct 14 22:30Z
        Generation("Oct 1", local("2024-10-01 00:30", BRUSSELS)),  # Sep 30 22:30Z
    ]
    for semantics in ("pbs", "borg"):
        brussels = run(generations, semantics, BRUSSELS, keep_monthly=-1)
        assert kept_ids(brussels) == ["Dec 1", "Nov 15", "Oct 15"], semantics
        utc = run(generations, semantics, UTC, keep_monthly=-1)
        assert kept_ids(utc) == ["Dec 1", "Nov 1", "Oct 1"], semantics


def test_monthly_runs_late_on_the_last_day_in_new_york() -> None:
    generations = [
        Generation("Nov 30 23:30", local("2024-11-30 23:30", NEW_YORK)),  # Dec 1 04:30Z
        Generation("Nov 15 12:00", local("2024-11-15 12:00", NEW_YORK)),  # Nov 15 17:00Z
        Generation("Oct 31 23:30", local("2024-10-31 23:30", NEW_YORK)),  # Nov 1 03:30Z (EDT)
    ]
    new_york = run(generations, "restic", NEW_YORK, keep_monthly=-1)
    assert reasons(new_york) == {
        "Nov 30 23:30": ("keep-monthly",),
        "Oct 31 23:30": ("keep-monthly",),
    }
    utc = run(generations, "restic", UTC, keep_monthly=-1)
    assert reasons(utc) == {
        "Nov 30 23:30": ("keep-monthly",),
        "Nov 15 12:00": ("keep-monthly",),
        "Oct 31 23:30": ("keep-monthly[oldest]",),
    }


# --------------------------------------------------------------------------------------
# keep-within across DST: restic steps the calendar in the zone, borg counts seconds from now


def test_restic_days_are_calendar_days_across_spring_forward() -> None:
    # Daily at 00:30 local, Thu Mar 28 .. Wed Apr 3 2024, Brussels.
    generations = [
        Generation(f"Mar {day}", local(f"2024-03-{day} 00:30", BRUSSELS)) for day in range(28, 32)
    ] + [Generation(f"Apr {day}", local(f"2024-04-0{day} 00:30", BRUSSELS)) for day in (1, 2, 3)]
    now = local("2024-04-03 00:31", BRUSSELS)
    # restic: Apr 3 00:30 - 3 days = Mar 31 00:30 CET, exactly the Mar 31 run: not after it.
    restic = run(generations, "restic", BRUSSELS, now=now, within=KeepWithin("3d", days=3))
    assert kept_ids(restic) == ["Apr 3", "Apr 2", "Apr 1"]
    # borg: 72 hours before now is Mar 30 23:31 CET, so the Mar 31 00:30 run is within.
    borg = run(generations, "borg", BRUSSELS, now=now, within=parse_keep_within("3d", "borg"))
    assert kept_ids(borg) == ["Apr 3", "Apr 2", "Apr 1", "Mar 31"]


@pytest.mark.parametrize(
    ("zone", "days", "latest", "inside", "outside"),
    [
        # Brussels fall-back: Oct 28 12:00 CET - 2 days = Oct 26 12:00 CEST (10:00Z), 49 h.
        (BRUSSELS, 2, "2024-10-28 11:00", "2024-10-26 10:30", "2024-10-26 09:30"),
        # New York fall-back: Nov 4 12:00 EST - 2 days = Nov 2 12:00 EDT (16:00Z), 49 h.
        (NEW_YORK, 2, "2024-11-04 17:00", "2024-11-02 16:30", "2024-11-02 15:30"),
        # New York spring: Mar 11 12:00 EDT - 2 days = Mar 9 12:00 EST (17:00Z), 47 h.
        (NEW_YORK, 2, "2024-03-11 16:00", "2024-03-09 17:30", "2024-03-09 16:30"),
        # Brussels spring: Apr 1 12:00 CEST - 2 days = Mar 30 12:00 CET (11:00Z), 47 h.
        (BRUSSELS, 2, "2024-04-01 10:00", "2024-03-30 11:30", "2024-03-30 10:30"),
        # A calendar step that lands in a skipped or repeated hour, resolved as Go's Date does.
        # Brussels: Mar 31 02:30 never happens; Go's Date reads it with the CET offset,
        # giving 01:30Z (03:30 CEST).
        (BRUSSELS, 1, "2024-04-01 00:30", "2024-03-31 01:45", "2024-03-31 01:15"),
        # New York: Mar 10 02:30 never happens; Go's Date reads it with the EDT offset,
        # giving 06:30Z (01:30 EST).
        (NEW_YORK, 1, "2024-03-11 06:30", "2024-03-10 06:45", "2024-03-10 06:15"),
        # Brussels: Oct 27 02:30 happens twice; Go's Date takes the CET one (01:30Z).
        (BRUSSELS, 1, "2024-10-28 01:30", "2024-10-27 01:45", "2024-10-27 01:15"),
        # New York: Nov 3 01:30 happens twice; Go's Date takes the EDT one (05:30Z).
        (NEW_YORK, 1, "2024-11-04 06:30", "2024-11-03 05:45", "2024-11-03 05:15"),
    ],
    ids=[
        "Brussels-fall",
        "NewYork-fall",
        "NewYork-spring",
        "Brussels-spring",
        "Brussels-gap",
        "NewYork-gap",
        "Brussels-fold",
        "NewYork-fold",
    ],
)
def test_restic_within_keeps_the_wall_clock(
    zone: tzinfo, days: int, latest: str, inside: str, outside: str
) -> None:
    generations = [
        Generation("latest", z(latest)),
        Generation("inside", z(inside)),
        Generation("outside", z(outside)),
    ]
    now = z(latest) + timedelta(minutes=1)
    within = KeepWithin(f"{days}d", days=days)
    result = run(generations, "restic", zone, now=now, within=within)
    assert kept_ids(result) == ["latest", "inside"]
    # Hours are hours: 48h keeps what is less than 48 real hours older than the newest,
    # which is 1 hour more or less than the 2 calendar days.
    hours = run(generations, "restic", zone, now=now, within=KeepWithin("48h", hours=48))
    by_hours = [gen.id for gen in generations if z(latest) - gen.time < timedelta(hours=48)]
    assert kept_ids(hours) == by_hours
    assert by_hours != kept_ids(result)


def test_restic_day_and_borg_day_differ_over_the_23_hour_day() -> None:
    # now Mar 31 12:00:01 CEST (10:00:01Z); newest Mar 31 12:00 CEST (10:00Z).
    generations = [
        Generation("newest", z("2024-03-31 10:00")),
        Generation("22.5h", z("2024-03-30 11:30")),  # Mar 30 12:30 CET
        Generation("23.5h", z("2024-03-30 10:30")),  # Mar 30 11:30 CET
    ]
    now = local("2024-03-31 12:00:01", BRUSSELS)
    # restic 1d: Mar 30 12:00 CET (11:00Z): the 11:30 CET run is before it.
    restic_day = run(generations, "restic", BRUSSELS, now=now, within=KeepWithin("1d", days=1))
    assert kept_ids(restic_day) == ["newest", "22.5h"]
    # restic 24h: 24 real hours before the newest (Mar 30 10:00Z).
    restic_hours = run(generations, "restic", BRUSSELS, now=now, within=KeepWithin("24h", hours=24))
    assert kept_ids(restic_hours) == ["newest", "22.5h", "23.5h"]
    # borg 1d is 86400 s from now, whatever zone `now` is given in.
    for moment in (now, now.astimezone(UTC), now.astimezone(NEW_YORK)):
        borg = run(
            generations, "borg", BRUSSELS, now=moment, within=parse_keep_within("1d", "borg")
        )
        assert kept_ids(borg) == ["newest", "22.5h", "23.5h"]


def test_borg_within_is_real_seconds_across_fall_back() -> None:
    # now Oct 27 12:00 CET (11:00Z): 24H back is Oct 26 11:00Z = 13:00 CEST (25 wall hours).
    generations = [
        Generation("12:59 CEST", z("2024-10-26 10:59")),
        Generation("13:01 CEST", z("2024-10-26 11:01")),
    ]
    now = local("2024-10-27 12:00", BRUSSELS)
    borg = run(generations, "borg", BRUSSELS, now=now, within=parse_keep_within("24H", "borg"))
    assert reasons(borg) == {"13:01 CEST": ("keep-within",)}
    assert pruned_ids(borg) == ["12:59 CEST"]


def test_restic_day_before_a_fall_back_is_25_hours() -> None:
    # New York: newest Nov 4 00:30 EST (05:30Z); 1d back is Nov 3 00:30 EDT (04:30Z).
    generations = [
        Generation("Nov 4 00:30", z("2024-11-04 05:30")),
        Generation("Nov 3 00:45", z("2024-11-03 04:45")),
        Generation("Nov 3 00:30", z("2024-11-03 04:30")),
    ]
    now = z("2024-11-04 05:31")
    restic = run(generations, "restic", NEW_YORK, now=now, within=KeepWithin("1d", days=1))
    assert kept_ids(restic) == ["Nov 4 00:30", "Nov 3 00:45"]
    # borg 1d from now is Nov 3 05:31Z: neither older run is within.
    borg = run(generations, "borg", NEW_YORK, now=now, within=parse_keep_within("1d", "borg"))
    assert kept_ids(borg) == ["Nov 4 00:30"]
