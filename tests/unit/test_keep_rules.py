"""keep-* rules of pbs, borg and restic: upstream test facts and hand-worked differences.

Every expected value below is worked out by hand from the tools' own algorithms (proxmox
prune `mark_selections`, borg 1.x `prune_split`/`prune_within`, restic `ApplyPolicy`), or
copied from their test suites. All times are UTC and planned in UTC unless said otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

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
# `now` for cases where keep-within plays no part: every generation is in the past.
LATER = datetime(2100, 1, 1, tzinfo=UTC)


def utc(text: str) -> datetime:
    """'2019-12-04 11:59:15' (fractions allowed) as an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def stamped(*texts: str) -> list[Generation]:
    """One generation per timestamp text; the text is its id."""
    return [Generation(text, utc(text)) for text in texts]


def daily_at(clock: str, *days: str) -> list[Generation]:
    """One generation per day at `clock`; the day is its id."""
    return [Generation(day, utc(f"{day} {clock}")) for day in days]


def run(
    generations: Sequence[Generation],
    semantics: Semantics,
    now: datetime = LATER,
    within: KeepWithin | None = None,
    **counts: int,
) -> Plan:
    rules = RetentionRules(semantics=semantics, keep_within=within, **counts)
    return plan(generations, rules, now, UTC)


def single(expected: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """{id: reason} -> {id: (reason,)} for the one-reason semantics (pbs, borg)."""
    return {key: (value,) for key, value in expected.items()}


# --------------------------------------------------------------------------------------
# Proxmox (PBS/PVE): facts from proxmox-backup tests/prune.rs

PBS_DAYS = (
    "2018-11-15",
    "2019-11-15",
    "2019-11-21",
    "2019-11-22",
    "2019-11-29",
    "2019-12-01",
    "2019-12-02",
    "2019-12-03",
    "2019-12-04",
)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"keep_daily": 1}, {"2019-12-04": "keep-daily"}),
        (
            {"keep_last": 1, "keep_daily": 1},
            {"2019-12-04": "keep-last", "2019-12-03": "keep-daily"},
        ),
        (
            {"keep_daily": 1, "keep_weekly": 1},
            {"2019-12-04": "keep-daily", "2019-12-01": "keep-weekly"},
        ),
        (
            {"keep_daily": 1, "keep_weekly": 1, "keep_monthly": 1},
            {"2019-12-04": "keep-daily", "2019-12-01": "keep-weekly", "2019-11-22": "keep-monthly"},
        ),
        (
            {"keep_monthly": 1, "keep_yearly": 1},
            {"2019-12-04": "keep-monthly", "2018-11-15": "keep-yearly"},
        ),
        # daily takes 12-04, 12-03; weekly skips W49 (already kept), takes W48 and W47;
        # 11-29 and 11-21 are marked removed inside their included weeks.
        (
            {"keep_daily": 2, "keep_weekly": 2},
            {
                "2019-12-04": "keep-daily",
                "2019-12-03": "keep-daily",
                "2019-12-01": "keep-weekly",
                "2019-11-22": "keep-weekly",
            },
        ),
        (
            {"keep_last": 3},
            {"2019-12-04": "keep-last", "2019-12-03": "keep-last", "2019-12-02": "keep-last"},
        ),
        # ISO weeks: W49 {12-02..12-04}, W48 {11-29, 12-01}, W47 {11-21, 11-22}, 2019-W46, 2018-W46.
        (
            {"keep_weekly": -1},
            {
                "2019-12-04": "keep-weekly",
                "2019-12-01": "keep-weekly",
                "2019-11-22": "keep-weekly",
                "2019-11-15": "keep-weekly",
                "2018-11-15": "keep-weekly",
            },
        ),
        ({"keep_yearly": 5}, {"2019-12-04": "keep-yearly", "2018-11-15": "keep-yearly"}),
    ],
)
def test_pbs_upstream_daily_cases(counts: dict[str, int], expected: dict[str, str]) -> None:
    result = run(daily_at("11:59:15", *PBS_DAYS), "pbs", **counts)
    assert reasons(result) == single(expected)
    assert kept_ids(result) == sorted(expected, reverse=True)
    assert pruned_ids(result) == sorted(set(PBS_DAYS) - set(expected), reverse=True)


PBS_HOURS = ("09:39:15", "10:49:15", "10:59:15", "11:39:15", "11:49:15", "11:59:15")


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (2, ["11:59:15", "10:59:15"]),
        (3, ["11:59:15", "10:59:15", "09:39:15"]),
        (-1, ["11:59:15", "10:59:15", "09:39:15"]),
    ],
)
def test_pbs_upstream_hourly(count: int, expected: list[str]) -> None:
    generations = [Generation(clock, utc(f"2019-11-15 {clock}")) for clock in PBS_HOURS]
    result = run(generations, "pbs", keep_hourly=count)
    assert kept_ids(result) == expected
    assert all(kept.reasons == ("keep-hourly",) for kept in result.keep)


# --------------------------------------------------------------------------------------
# borg 1.x: facts from borg's test_prune_split_keep_oldest and test_prune_within

BORG_YEAR_ENDS = ("2018-01-01", "2018-12-30", "2018-12-31", "2019-12-31")


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (
            3,
            {
                "2019-12-31": "keep-yearly",
                "2018-12-31": "keep-yearly",
                "2018-01-01": "keep-yearly[oldest]",
            },
        ),
        (2, {"2019-12-31": "keep-yearly", "2018-12-31": "keep-yearly"}),
        # -1 has no target to miss, so no [oldest].
        (-1, {"2019-12-31": "keep-yearly", "2018-12-31": "keep-yearly"}),
    ],
)
def test_borg_yearly_keeps_oldest_only_when_short(count: int, expected: dict[str, str]) -> None:
    result = run(daily_at("10:00:00", *BORG_YEAR_ENDS), "borg", keep_yearly=count)
    assert reasons(result) == single(expected)


BORG_WITHIN_AGES = (
    timedelta(minutes=1),
    timedelta(hours=1.5),
    timedelta(hours=2.5),
    timedelta(hours=3.5),
    timedelta(hours=25),
    timedelta(hours=49),
)


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ("1H", [0]),
        ("2H", [0, 1]),
        ("3H", [0, 1, 2]),
        ("24H", [0, 1, 2, 3]),
        ("26H", [0, 1, 2, 3, 4]),
        ("2d", [0, 1, 2, 3, 4]),
        ("50H", [0, 1, 2, 3, 4, 5]),
        ("3d", [0, 1, 2, 3, 4, 5]),
        ("1w", [0, 1, 2, 3, 4, 5]),
        ("1m", [0, 1, 2, 3, 4, 5]),
        ("1y", [0, 1, 2, 3, 4, 5]),
    ],
)
def test_borg_within_from_now(interval: str, expected: list[int]) -> None:
    now = utc("2024-06-01 12:00:00")
    generations = [Generation(f"a{i}", now - age) for i, age in enumerate(BORG_WITHIN_AGES)]
    result = run(generations, "borg", now=now, within=parse_keep_within(interval, "borg"))
    assert kept_ids(result) == [f"a{i}" for i in expected]
    assert all(kept.reasons == ("keep-within",) for kept in result.keep)


def test_borg_within_counts_from_now_not_from_the_newest() -> None:
    generations = daily_at("12:00:00", "2024-01-05", "2024-01-04", "2024-01-03")
    within = parse_keep_within("2d", "borg")
    # now long after: nothing is within, only the newest survives (planner's rule).
    late = run(generations, "borg", now=utc("2030-01-01 00:00:00"), within=within)
    assert reasons(late) == {"2024-01-05": ("newest",)}
    # now just after the newest: 2 days back reaches past 01-04 12:00 but not 01-03 12:00.
    soon = run(generations, "borg", now=utc("2024-01-05 12:00:01"), within=within)
    assert kept_ids(soon) == ["2024-01-05", "2024-01-04"]


def test_borg_within_is_strictly_after_the_limit() -> None:
    now = utc("2024-06-01 12:00:00")
    generations = [
        Generation("1h", now - timedelta(hours=1)),
        Generation("24h-1s", now - timedelta(hours=24) + timedelta(seconds=1)),
        Generation("24h", now - timedelta(hours=24)),
    ]
    result = run(generations, "borg", now=now, within=parse_keep_within("24H", "borg"))
    assert kept_ids(result) == ["1h", "24h-1s"]
    assert pruned_ids(result) == ["24h"]


def test_borg_within_keeps_future_archives() -> None:
    generations = stamped("2024-01-06 12:00:00", "2024-01-05 11:00:00", "2024-01-03 12:00:00")
    within = parse_keep_within("1d", "borg")
    result = run(generations, "borg", now=utc("2024-01-05 12:00:00"), within=within)
    assert kept_ids(result) == ["2024-01-06 12:00:00", "2024-01-05 11:00:00"]


def test_borg_within_uses_up_periods_of_later_rules() -> None:
    # within keeps 01-10 11:00; daily then sees day 01-10 as used (not counted) and keeps
    # the next two days. restic's daily bucket instead counts 01-10 itself.
    generations = stamped(
        "2024-01-10 11:00:00",
        "2024-01-10 08:00:00",
        "2024-01-09 20:00:00",
        "2024-01-09 08:00:00",
        "2024-01-08 20:00:00",
    )
    borg = run(
        generations,
        "borg",
        now=utc("2024-01-10 12:00:00"),
        within=parse_keep_within("2H", "borg"),
        keep_daily=2,
    )
    assert reasons(borg) == single(
        {
            "2024-01-10 11:00:00": "keep-within",
            "2024-01-09 20:00:00": "keep-daily",
            "2024-01-08 20:00:00": "keep-daily",
        }
    )
    restic = run(
        generations,
        "restic",
        now=utc("2024-01-10 12:00:00"),
        within=KeepWithin("2h", hours=2),
        keep_daily=2,
    )
    assert reasons(restic) == {
        "2024-01-10 11:00:00": ("keep-within", "keep-daily"),
        "2024-01-09 20:00:00": ("keep-daily",),
    }


# --------------------------------------------------------------------------------------
# restic: the snapshot list of restic's TestApplyPolicy and its golden files

RESTIC_SNAPSHOTS = (
    "2014-09-01 10:20:30",
    "2014-09-02 10:20:30",
    "2014-09-05 10:20:30",
    "2014-09-06 10:20:30",
    "2014-09-08 10:20:30",
    "2014-09-09 10:20:30",
    "2014-09-10 10:20:30",
    "2014-09-11 10:20:30",
    "2014-09-20 10:20:30",
    "2014-09-22 10:20:30",
    "2014-08-08 10:20:30",
    "2014-08-10 10:20:30",
    "2014-08-12 10:20:30",
    "2014-08-13 10:20:30",
    "2014-08-13 10:20:30.1",
    "2014-08-15 10:20:30",
    "2014-08-18 10:20:30",
    "2014-08-20 10:20:30",
    "2014-08-21 10:20:30",
    "2014-08-22 10:20:30",
    "2014-10-01 10:20:30",
    "2014-10-02 10:20:30",
    "2014-10-05 10:20:30",
    "2014-10-06 10:20:30",
    "2014-10-08 10:20:30",
    "2014-10-09 10:20:30",
    "2014-10-10 10:20:30",
    "2014-10-11 10:20:30",
    "2014-10-20 10:20:30",
    "2014-10-22 10:20:30",
    "2014-11-08 10:20:30",
    "2014-11-10 10:20:30",
    "2014-11-12 10:20:30",
    "2014-11-13 10:20:30",
    "2014-11-13 10:20:30.1",
    "2014-11-15 10:20:30",
    "2014-11-18 10:20:30",
    "2014-11-20 10:20:30",
    "2014-11-21 10:20:30",
    "2014-11-22 10:20:30",
    "2015-09-01 10:20:30",
    "2015-09-02 10:20:30",
    "2015-09-05 10:20:30",
    "2015-09-06 10:20:30",
    "2015-09-08 10:20:30",
    "2015-09-09 10:20:30",
    "2015-09-10 10:20:30",
    "2015-09-11 10:20:30",
    "2015-09-20 10:20:30",
    "2015-09-22 10:20:30",
    "2015-08-08 10:20:30",
    "2015-08-10 10:20:30",
    "2015-08-12 10:20:30",
    "2015-08-13 10:20:30",
    "2015-08-13 10:20:30.1",
    "2015-08-15 10:20:30",
    "2015-08-18 10:20:30",
    "2015-08-20 10:20:30",
    "2015-08-21 10:20:30",
    "2015-08-22 10:20:30",
    "2015-10-01 10:20:30",
    "2015-10-02 10:20:30",
    "2015-10-05 10:20:30",
    "2015-10-06 10:20:30",
    "2015-10-08 10:20:30",
    "2015-10-09 10:20:30",
    "2015-10-10 10:20:30",
    "2015-10-11 10:20:30",
    "2015-10-20 10:20:30",
    "2015-10-22 10:20:30",
    "2015-10-22 10:20:30",
    "2015-10-22 10:20:30",
    "2015-10-22 10:20:30",
    "2015-10-22 10:20:30",
    "2015-11-08 10:20:30",
    "2015-11-10 10:20:30",
    "2015-11-12 10:20:30",
    "2015-11-13 10:20:30",
    "2015-11-13 10:20:30.1",
    "2015-11-15 10:20:30",
    "2015-11-18 10:20:30",
    "2015-11-20 10:20:30",
    "2015-11-21 10:20:30",
    "2015-11-22 10:20:30",
    "2016-01-01 01:02:03",
    "2016-01-01 01:03:03",
    "2016-01-01 07:08:03",
    "2016-01-03 07:02:03",
    "2016-01-04 10:23:03",
    "2016-01-04 11:23:03",
    "2016-01-04 12:23:03",
    "2016-01-04 12:24:03",
    "2016-01-04 12:28:03",
    "2016-01-04 12:30:03",
    "2016-01-04 16:23:03",
    "2016-01-05 09:02:03",
    "2016-01-06 08:02:03",
    "2016-01-07 10:02:03",
    "2016-01-08 20:02:03",
    "2016-01-09 21:02:03",
    "2016-01-12 21:02:03",
    "2016-01-12 21:08:03",
    "2016-01-18 12:02:03",
)


def restic_upstream() -> list[Generation]:
    """Ids are input positions: the list has duplicate times (five at 2015-10-22)."""
    return [Generation(f"s{i:03d}", utc(text)) for i, text in enumerate(RESTIC_SNAPSHOTS)]


def kept_times(result: Plan) -> list[tuple[datetime, tuple[str, ...]]]:
    return [(kept.generation.time, kept.reasons) for kept in result.keep]


def test_restic_upstream_list_has_all_snapshots() -> None:
    assert len(RESTIC_SNAPSHOTS) == 103


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # golden policy_keep_snapshots_16: {Yearly: 10}
        (
            {"keep_yearly": 10},
            [
                ("2016-01-18 12:02:03", ("keep-yearly",)),
                ("2015-11-22 10:20:30", ("keep-yearly",)),
                ("2014-11-22 10:20:30", ("keep-yearly",)),
                ("2014-08-08 10:20:30", ("keep-yearly[oldest]",)),
            ],
        ),
        # counts used up before the end: no oldest.
        (
            {"keep_yearly": 3},
            [
                ("2016-01-18 12:02:03", ("keep-yearly",)),
                ("2015-11-22 10:20:30", ("keep-yearly",)),
                ("2014-11-22 10:20:30", ("keep-yearly",)),
            ],
        ),
        # golden policy_keep_snapshots_15: {Daily: 2, Weekly: 2, Monthly: 6}
        (
            {"keep_daily": 2, "keep_weekly": 2, "keep_monthly": 6},
            [
                ("2016-01-18 12:02:03", ("keep-daily", "keep-weekly", "keep-monthly")),
                ("2016-01-12 21:08:03", ("keep-daily", "keep-weekly")),
                ("2015-11-22 10:20:30", ("keep-monthly",)),
                ("2015-10-22 10:20:30", ("keep-monthly",)),
                ("2015-09-22 10:20:30", ("keep-monthly",)),
                ("2015-08-22 10:20:30", ("keep-monthly",)),
                ("2014-11-22 10:20:30", ("keep-monthly",)),
            ],
        ),
        # golden policy_keep_snapshots_39: {Daily: 3, Weekly: 2, Monthly: -1, Yearly: -1}
        (
            {"keep_daily": 3, "keep_weekly": 2, "keep_monthly": -1, "keep_yearly": -1},
            [
                (
                    "2016-01-18 12:02:03",
                    ("keep-daily", "keep-weekly", "keep-monthly", "keep-yearly"),
                ),
                ("2016-01-12 21:08:03", ("keep-daily", "keep-weekly")),
                ("2016-01-09 21:02:03", ("keep-daily",)),
                ("2015-11-22 10:20:30", ("keep-monthly", "keep-yearly")),
                ("2015-10-22 10:20:30", ("keep-monthly",)),
                ("2015-09-22 10:20:30", ("keep-monthly",)),
                ("2015-08-22 10:20:30", ("keep-monthly",)),
                ("2014-11-22 10:20:30", ("keep-monthly", "keep-yearly")),
                ("2014-10-22 10:20:30", ("keep-monthly",)),
                ("2014-09-22 10:20:30", ("keep-monthly",)),
                ("2014-08-22 10:20:30", ("keep-monthly",)),
                ("2014-08-08 10:20:30", ("keep-monthly[oldest]", "keep-yearly[oldest]")),
            ],
        ),
        # {Last: 2, Daily: 3}: buckets are independent, last does not use up a day.
        (
            {"keep_last": 2, "keep_daily": 3},
            [
                ("2016-01-18 12:02:03", ("keep-last", "keep-daily")),
                ("2016-01-12 21:08:03", ("keep-last", "keep-daily")),
                ("2016-01-09 21:02:03", ("keep-daily",)),
            ],
        ),
    ],
)
def test_restic_upstream_policies(
    counts: dict[str, int], expected: list[tuple[str, tuple[str, ...]]]
) -> None:
    result = run(restic_upstream(), "restic", **counts)
    assert kept_times(result) == [(utc(text), why) for text, why in expected]
    assert len(result.keep) + len(result.prune) == 103


def test_restic_keeps_the_first_of_equal_times_in_input_order() -> None:
    # Five snapshots at 2015-10-22 10:20:30 (input positions 69..73): the stable sort puts
    # s069 first, so it is the one the monthly bucket keeps.
    result = run(restic_upstream(), "restic", keep_monthly=6)
    ids = {kept.generation.time: kept.generation.id for kept in result.keep}
    assert ids[utc("2015-10-22 10:20:30")] == "s069"


@pytest.mark.parametrize(
    ("within", "cutoff", "count"),
    [
        # latest is 2016-01-18 12:02:03; cutoff = latest.AddDate(-y, -m, -d) - h.
        (KeepWithin("1d", days=1), "2016-01-17 12:02:03", 1),
        (KeepWithin("2d", days=2), "2016-01-16 12:02:03", 1),
        (KeepWithin("7d", days=7), "2016-01-11 12:02:03", 3),
        (KeepWithin("1m", months=1), "2015-12-18 12:02:03", 19),
        (KeepWithin("1m14d", months=1, days=14), "2015-12-04 12:02:03", 19),
        (KeepWithin("13d23h", days=13, hours=23), "2016-01-04 13:02:03", 9),
        (KeepWithin("2m2h", months=2, hours=2), "2015-11-18 10:02:03", 23),
        (KeepWithin("1y2m3d3h", years=1, months=2, days=3, hours=3), "2014-11-15 09:02:03", 68),
        # Before year 1: everything is within (restic's own test uses 9999y).
        (KeepWithin("9999y", years=9999), "0001-01-01 00:00:00", 103),
    ],
)
def test_restic_upstream_within(within: KeepWithin, cutoff: str, count: int) -> None:
    result = run(restic_upstream(), "restic", within=within)
    limit = utc(cutoff)
    expected = sorted((utc(text) for text in RESTIC_SNAPSHOTS if utc(text) > limit), reverse=True)
    assert len(expected) == count
    assert [kept.generation.time for kept in result.keep] == expected
    assert all(kept.reasons == ("keep-within",) for kept in result.keep)


@pytest.mark.parametrize(
    ("newest", "within", "kept", "pruned"),
    [
        # 2024-03-31 - 1 month = 2024-02-31 = 2024-03-02 (leap year), not 02-29.
        (
            "2024-03-31 10:00:00",
            KeepWithin("1m", months=1),
            ["2024-03-03 09:00:00", "2024-03-02 11:00:00"],
            ["2024-03-02 10:00:00", "2024-03-02 09:00:00", "2024-03-01 10:00:00"],
        ),
        # 2023-03-31 - 1 month = 2023-02-31 = 2023-03-03.
        (
            "2023-03-31 10:00:00",
            KeepWithin("1m", months=1),
            ["2023-03-03 11:00:00"],
            ["2023-03-03 10:00:00", "2023-03-03 09:00:00", "2023-03-01 10:00:00"],
        ),
        # 2024-02-29 - 1 year = 2023-02-29 = 2023-03-01.
        (
            "2024-02-29 12:00:00",
            KeepWithin("1y", years=1),
            ["2023-03-01 12:00:01"],
            ["2023-03-01 12:00:00", "2023-02-28 13:00:00"],
        ),
        # days, then hours: 2024-01-10 12:00 -> 01-09 12:00 -> 01-09 10:00.
        (
            "2024-01-10 12:00:00",
            KeepWithin("1d2h", days=1, hours=2),
            ["2024-01-09 10:30:00"],
            ["2024-01-09 10:00:00", "2024-01-09 09:30:00"],
        ),
    ],
)
def test_restic_within_is_go_adddate_from_the_newest(
    newest: str, within: KeepWithin, kept: list[str], pruned: list[str]
) -> None:
    generations = stamped(newest, *kept, *pruned)
    result = run(generations, "restic", now=utc("2030-01-01 00:00:00"), within=within)
    assert kept_ids(result) == [newest, *kept]
    assert pruned_ids(result) == pruned
    assert all(kept.reasons == ("keep-within",) for kept in result.keep)


def test_borg_month_is_31_days_from_now_where_restic_is_a_calendar_month() -> None:
    texts = (
        "2024-03-31 10:00:00",
        "2024-03-03 09:00:00",
        "2024-03-02 11:00:00",
        "2024-03-02 10:00:00",
        "2024-03-02 09:00:00",
        "2024-03-01 10:00:00",
        "2024-02-29 10:00:00",
    )
    now = utc("2024-03-31 10:00:01")
    borg = run(stamped(*texts), "borg", now=now, within=parse_keep_within("1m", "borg"))
    restic = run(stamped(*texts), "restic", now=now, within=parse_keep_within("1m", "restic"))
    # borg: now - 31 days = 2024-02-29 10:00:01.
    assert kept_ids(borg) == list(texts[:6])
    # restic: newest - 1 calendar month = 2024-03-02 10:00:00 (Go normalises 02-31).
    assert kept_ids(restic) == list(texts[:3])


@pytest.mark.parametrize(
    ("now", "kept"),
    [
        # now equal to the newest: it is not "before now", latest is 09:00, cutoff 08:00.
        ("2024-05-01 10:00:00", ["2024-05-01 10:00:00", "2024-05-01 09:00:00"]),
        ("2024-05-01 10:00:01", ["2024-05-01 10:00:00"]),
        # a generation after now is no latest, but is after the cutoff: kept.
        ("2024-05-01 09:30:00", ["2024-05-01 10:00:00", "2024-05-01 09:00:00"]),
    ],
)
def test_restic_within_newest_is_the_newest_before_now(now: str, kept: list[str]) -> None:
    generations = stamped("2024-05-01 10:00:00", "2024-05-01 09:00:00", "2024-05-01 08:00:00")
    result = run(generations, "restic", now=utc(now), within=KeepWithin("1h", hours=1))
    assert kept_ids(result) == kept


def test_restic_within_with_nothing_before_now_keeps_everything() -> None:
    generations = stamped("2024-05-01 10:00:00", "2023-01-01 00:00:00")
    result = run(
        generations, "restic", now=utc("2020-01-01 00:00:00"), within=KeepWithin("1h", hours=1)
    )
    assert pruned_ids(result) == []


# --------------------------------------------------------------------------------------
# Same input, different result: what sets the three rule families apart

Expected = dict[str, tuple[str, ...]]


def weekly_monthly_case() -> list[Generation]:
    # ISO 2024-W18 is Mon 04-29 .. Sun 05-05; 04-28 is W17, 04-20 is W16.
    return daily_at(
        "12:00:00",
        "2024-05-02",
        "2024-05-01",
        "2024-04-30",
        "2024-04-29",
        "2024-04-28",
        "2024-04-20",
    )


def twice_a_day() -> list[Generation]:
    return stamped(
        "2024-01-03 20:00:00",
        "2024-01-03 10:00:00",
        "2024-01-02 20:00:00",
        "2024-01-02 10:00:00",
        "2024-01-01 20:00:00",
        "2024-01-01 10:00:00",
    )


DIFFERENCES: list[tuple[str, list[Generation], dict[str, int], dict[str, Expected]]] = [
    (
        # restic counts 12-04 in both buckets; borg and pbs go on to the previous week.
        "daily1-weekly1",
        daily_at("11:59:15", *PBS_DAYS),
        {"keep_daily": 1, "keep_weekly": 1},
        {
            "pbs": single({"2019-12-04": "keep-daily", "2019-12-01": "keep-weekly"}),
            "borg": single({"2019-12-04": "keep-daily", "2019-12-01": "keep-weekly"}),
            "restic": {"2019-12-04": ("keep-daily", "keep-weekly")},
        },
    ),
    (
        # pbs: weekly marks 05-01..04-29 removed, monthly then picks 04-28 for April.
        # borg: April starts at 04-30; short of 2 months, the oldest is kept.
        # restic: 05-02 fills weekly and May, 04-30 April; counts used up, no oldest.
        "weekly1-monthly2",
        weekly_monthly_case(),
        {"keep_weekly": 1, "keep_monthly": 2},
        {
            "pbs": single({"2024-05-02": "keep-weekly", "2024-04-28": "keep-monthly"}),
            "borg": single(
                {
                    "2024-05-02": "keep-weekly",
                    "2024-04-30": "keep-monthly",
                    "2024-04-20": "keep-monthly[oldest]",
                }
            ),
            "restic": {
                "2024-05-02": ("keep-weekly", "keep-monthly"),
                "2024-04-30": ("keep-monthly",),
            },
        },
    ),
    (
        # Counts left over: borg and restic keep the oldest, pbs never does.
        "daily5-short",
        twice_a_day(),
        {"keep_daily": 5},
        {
            "pbs": single(
                {
                    "2024-01-03 20:00:00": "keep-daily",
                    "2024-01-02 20:00:00": "keep-daily",
                    "2024-01-01 20:00:00": "keep-daily",
                }
            ),
            "borg": single(
                {
                    "2024-01-03 20:00:00": "keep-daily",
                    "2024-01-02 20:00:00": "keep-daily",
                    "2024-01-01 20:00:00": "keep-daily",
                    "2024-01-01 10:00:00": "keep-daily[oldest]",
                }
            ),
            "restic": {
                "2024-01-03 20:00:00": ("keep-daily",),
                "2024-01-02 20:00:00": ("keep-daily",),
                "2024-01-01 20:00:00": ("keep-daily",),
                "2024-01-01 10:00:00": ("keep-daily[oldest]",),
            },
        },
    ),
    (
        # -1 = unlimited: restic still keeps the oldest, borg and pbs do not.
        "daily-unlimited",
        twice_a_day(),
        {"keep_daily": -1},
        {
            "pbs": single(
                {
                    "2024-01-03 20:00:00": "keep-daily",
                    "2024-01-02 20:00:00": "keep-daily",
                    "2024-01-01 20:00:00": "keep-daily",
                }
            ),
            "borg": single(
                {
                    "2024-01-03 20:00:00": "keep-daily",
                    "2024-01-02 20:00:00": "keep-daily",
                    "2024-01-01 20:00:00": "keep-daily",
                }
            ),
            "restic": {
                "2024-01-03 20:00:00": ("keep-daily",),
                "2024-01-02 20:00:00": ("keep-daily",),
                "2024-01-01 20:00:00": ("keep-daily",),
                "2024-01-01 10:00:00": ("keep-daily[oldest]",),
            },
        },
    ),
    (
        # borg's yearly[oldest] fact; restic agrees, pbs has no oldest.
        "yearly3",
        daily_at("10:00:00", *BORG_YEAR_ENDS),
        {"keep_yearly": 3},
        {
            "pbs": single({"2019-12-31": "keep-yearly", "2018-12-31": "keep-yearly"}),
            "borg": single(
                {
                    "2019-12-31": "keep-yearly",
                    "2018-12-31": "keep-yearly",
                    "2018-01-01": "keep-yearly[oldest]",
                }
            ),
            "restic": {
                "2019-12-31": ("keep-yearly",),
                "2018-12-31": ("keep-yearly",),
                "2018-01-01": ("keep-yearly[oldest]",),
            },
        },
    ),
    (
        # last + daily: borg/pbs daily skip the day keep-last already covers.
        "last1-daily1",
        twice_a_day(),
        {"keep_last": 1, "keep_daily": 1},
        {
            "pbs": single(
                {"2024-01-03 20:00:00": "keep-last", "2024-01-02 20:00:00": "keep-daily"}
            ),
            "borg": single(
                {"2024-01-03 20:00:00": "keep-last", "2024-01-02 20:00:00": "keep-daily"}
            ),
            "restic": {"2024-01-03 20:00:00": ("keep-last", "keep-daily")},
        },
    ),
]


@pytest.mark.parametrize("semantics", ["pbs", "borg", "restic"])
@pytest.mark.parametrize(
    ("generations", "counts", "expected"),
    [pytest.param(gens, counts, expected, id=name) for name, gens, counts, expected in DIFFERENCES],
)
def test_same_input_different_semantics(
    semantics: Semantics,
    generations: list[Generation],
    counts: dict[str, int],
    expected: dict[str, Expected],
) -> None:
    result = run(generations, semantics, **counts)
    assert reasons(result) == expected[semantics]
    assert kept_ids(result) == sorted(expected[semantics], reverse=True)


def test_iso_weeks_cross_the_year_end() -> None:
    # 2024-12-30 (Mon) and 2025-01-01 are ISO 2025-W01; 2024-12-29 (Sun) is 2024-W52.
    generations = daily_at("12:00:00", "2025-01-01", "2024-12-30", "2024-12-29")
    for semantics in ("pbs", "borg"):
        result = run(generations, semantics, keep_weekly=-1)
        assert kept_ids(result) == ["2025-01-01", "2024-12-29"], semantics
    restic = run(generations, "restic", keep_weekly=-1)
    assert kept_ids(restic) == ["2025-01-01", "2024-12-29"]


# --------------------------------------------------------------------------------------
# Identical timestamps are distinct generations

T = "2024-05-10 12:00:00"


def with_twins(first: str = "A", second: str = "B") -> list[Generation]:
    return [
        Generation(first, utc(T)),
        Generation(second, utc(T)),
        Generation("C", utc("2024-05-10 11:00:00")),
        Generation("D", utc("2024-05-10 10:00:00")),
    ]


@pytest.mark.parametrize(
    ("semantics", "expected"),
    [
        ("restic", ["A", "B"]),
        ("pbs", ["A", "B"]),
        # borg's keep-last is keep-secondly: B is in A's second.
        ("borg", ["A", "C"]),
    ],
)
def test_keep_last_with_identical_times(semantics: Semantics, expected: list[str]) -> None:
    result = run(with_twins(), semantics, keep_last=2)
    assert kept_ids(result) == expected
    assert all(kept.reasons == ("keep-last",) for kept in result.keep)


@pytest.mark.parametrize("semantics", ["restic", "pbs", "borg"])
def test_input_order_decides_among_equal_times(semantics: Semantics) -> None:
    result = run(with_twins("B", "A"), semantics, keep_last=1)
    assert reasons(result) == {"B": ("keep-last",)}
    assert pruned_ids(result) == ["A", "C", "D"]


def test_borg_second_ignores_fractions() -> None:
    generations = stamped(
        "2024-05-10 10:00:00.700000", "2024-05-10 10:00:00.200000", "2024-05-10 09:59:59.900000"
    )
    borg = run(generations, "borg", keep_last=2)
    assert kept_ids(borg) == ["2024-05-10 10:00:00.700000", "2024-05-10 09:59:59.900000"]
    restic = run(generations, "restic", keep_last=2)
    assert kept_ids(restic) == ["2024-05-10 10:00:00.700000", "2024-05-10 10:00:00.200000"]


def test_restic_hourly_with_identical_times() -> None:
    result = run(with_twins(), "restic", keep_hourly=2)
    assert reasons(result) == {"A": ("keep-hourly",), "C": ("keep-hourly",)}


# --------------------------------------------------------------------------------------
# Protected generations: kept, never counted


def with_protected() -> list[Generation]:
    return [
        Generation("P-new", utc("2024-06-05 12:00:00"), protected=True),
        Generation("A", utc("2024-06-04 12:00:00")),
        Generation("B", utc("2024-06-03 12:00:00")),
        Generation("C", utc("2024-06-02 12:00:00")),
        Generation("P-old", utc("2024-06-01 12:00:00"), protected=True),
    ]


@pytest.mark.parametrize("semantics", ["pbs", "borg", "restic"])
@pytest.mark.parametrize("counts", [{"keep_daily": 2}, {"keep_last": 2}])
def test_protected_are_kept_and_not_counted(semantics: Semantics, counts: dict[str, int]) -> None:
    result = run(with_protected(), semantics, **counts)
    (rule,) = (name.replace("_", "-") for name in counts)
    assert reasons(result) == {
        "P-new": ("protected",),
        "A": (rule,),
        "B": (rule,),
        "P-old": ("protected",),
    }
    assert pruned_ids(result) == ["C"]
    assert all(kept.labels == () for kept in result.keep if kept.generation.protected)


@pytest.mark.parametrize("semantics", ["pbs", "borg", "restic"])
def test_protected_does_not_use_up_its_day(semantics: Semantics) -> None:
    generations = [
        Generation("P", utc("2024-06-05 20:00:00"), protected=True),
        Generation("A", utc("2024-06-05 08:00:00")),
        Generation("B", utc("2024-06-04 08:00:00")),
    ]
    result = run(generations, semantics, keep_daily=1)
    assert reasons(result) == {"P": ("protected",), "A": ("keep-daily",)}


def test_newest_unprotected_is_kept_even_if_a_protected_is_newer() -> None:
    generations = [
        Generation("P", utc("2024-06-05 12:00:00"), protected=True),
        Generation("A", utc("2024-06-03 12:00:00")),
        Generation("B", utc("2024-06-02 12:00:00")),
    ]
    result = run(
        generations, "borg", now=utc("2024-06-05 12:30:00"), within=parse_keep_within("1H", "borg")
    )
    assert reasons(result) == {"P": ("protected",), "A": ("newest",)}
    assert pruned_ids(result) == ["B"]


# --------------------------------------------------------------------------------------
# Labels: keep-daily/weekly/monthly/yearly map to son/father/grandfather/yearly


def test_labels_follow_the_keep_rules() -> None:
    result = run(
        restic_upstream(),
        "restic",
        keep_last=1,
        keep_hourly=1,
        keep_daily=3,
        keep_weekly=2,
        keep_monthly=-1,
        keep_yearly=-1,
    )
    labels = {kept.generation.time: kept.labels for kept in result.keep}
    assert labels[utc("2016-01-18 12:02:03")] == ("yearly", "grandfather", "father", "son")
    assert labels[utc("2016-01-09 21:02:03")] == ("son",)
    assert labels[utc("2014-08-08 10:20:30")] == ("yearly", "grandfather")


def test_reason_without_a_calendar_label() -> None:
    result = run(twice_a_day(), "borg", keep_last=1, keep_hourly=1)
    assert [(kept.reasons, kept.labels) for kept in result.keep] == [
        (("keep-last",), ()),
        (("keep-hourly",), ()),
    ]
