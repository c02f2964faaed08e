"""The classic grandfather-father-son rotation (semantics `gfs`).

Roles go, in time order, to the first generation of each period: the first of a local day
is a son, the first of a week (weeks start on `father_weekday`) a father, the first father
dated in a month a grandfather, the first grandfather of a year a yearly. Each tier keeps
its N newest members. Expected values are worked out by hand from those rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest

from gfs_backup.retention import Generation, Plan, RetentionRules, plan
from tests.unit.plan_results import kept_ids, pruned_ids, reasons

pytestmark = pytest.mark.unit

UTC = timezone.utc
BRUSSELS = ZoneInfo("Europe/Brussels")
NOW = datetime(2100, 1, 1, tzinfo=UTC)  # gfs ignores `now`
EVERY_TIER = {"sons": -1, "fathers": -1, "grandfathers": -1}

# The DESIGN table: daily exports Monday to Saturday, four weeks from a month's first Monday.
DESIGN = [
    ["GF", "S", "S", "S", "S", "S"],
    ["F", "S", "S", "S", "S", "S"],
    ["F", "S", "S", "S", "S", "S"],
    ["F", "S", "S", "S", "S", "S"],
]
APRIL_1 = date(2024, 4, 1)  # a Monday


def days(start: date, count: int) -> list[date]:
    return [start + timedelta(days=n) for n in range(count)]


def mon_to_sat(first_monday: date, weeks: int, skip: Iterable[date] = ()) -> list[date]:
    missed = set(skip)
    every = [first_monday + timedelta(weeks=w, days=d) for w in range(weeks) for d in range(6)]
    return [day for day in every if day not in missed]


def runs(dates: Iterable[date], at: time = time(1, 0), zone: tzinfo = BRUSSELS) -> list[Generation]:
    """One generation per date at `at` local time; the ISO date is its id."""
    return [Generation(day.isoformat(), datetime.combine(day, at, tzinfo=zone)) for day in dates]


def gfs(
    generations: Sequence[Generation],
    zone: tzinfo = BRUSSELS,
    father_weekday: int = 0,
    **counts: int,
) -> Plan:
    rules = RetentionRules(semantics="gfs", father_weekday=father_weekday, **counts)
    return plan(generations, rules, NOW, zone)


def code(labels: Sequence[str]) -> str:
    """YGF / GF / F / S from the labels (a grandfather is also a father)."""
    letters = "".join(
        letter
        for label, letter in (("yearly", "Y"), ("grandfather", "G"), ("father", "F"))
        if label in labels
    )
    return letters or ("S" if "son" in labels else "?")


def codes(result: Plan) -> dict[str, str]:
    return {kept.generation.id: code(kept.labels) for kept in result.keep}


def grid(result: Plan, first_day: date, weeks: int, width: int = 6) -> list[list[str]]:
    """Rows of a week from `first_day`, `width` days each; '-' where nothing was kept."""
    by_day = codes(result)
    return [
        [
            by_day.get((first_day + timedelta(weeks=w, days=d)).isoformat(), "-")
            for d in range(width)
        ]
        for w in range(weeks)
    ]


# --------------------------------------------------------------------------------------
# The DESIGN table and missed runs


@pytest.mark.parametrize("zone", [BRUSSELS, UTC, ZoneInfo("America/New_York")])
def test_four_weeks_reproduce_the_design_table(zone: tzinfo) -> None:
    result = gfs(runs(mon_to_sat(APRIL_1, 4), zone=zone), zone=zone, **EVERY_TIER)
    assert grid(result, APRIL_1, 4) == DESIGN
    assert result.prune == []
    first = result.keep[-1]
    assert first.generation.id == "2024-04-01"
    assert first.labels == ("grandfather", "father", "son")
    assert first.reasons == ("son", "father", "grandfather")


@pytest.mark.parametrize("missed", [date(2024, 4, 8), date(2024, 4, 15), date(2024, 4, 22)])
def test_missed_monday_makes_tuesday_the_father(missed: date) -> None:
    result = gfs(runs(mon_to_sat(APRIL_1, 4, skip=[missed])), **EVERY_TIER)
    expected = [row[:] for row in DESIGN]
    week = (missed - APRIL_1).days // 7
    expected[week][:2] = ["-", "F"]
    assert grid(result, APRIL_1, 4) == expected


def test_missed_monday_and_tuesday_makes_wednesday_the_father() -> None:
    skip = [date(2024, 4, 8), date(2024, 4, 9)]
    result = gfs(runs(mon_to_sat(APRIL_1, 4, skip=skip)), **EVERY_TIER)
    assert grid(result, APRIL_1, 4)[1] == ["-", "-", "F", "S", "S", "S"]


def test_missed_first_monday_makes_tuesday_the_grandfather() -> None:
    result = gfs(runs(mon_to_sat(APRIL_1, 4, skip=[APRIL_1])), **EVERY_TIER)
    assert grid(result, APRIL_1, 4) == [["-", "GF", "S", "S", "S", "S"], *DESIGN[1:]]


def test_missed_first_week_makes_the_next_father_of_the_month_grandfather() -> None:
    result = gfs(runs(mon_to_sat(APRIL_1, 4, skip=days(APRIL_1, 6))), **EVERY_TIER)
    assert grid(result, APRIL_1, 4) == [
        ["-", "-", "-", "-", "-", "-"],
        ["GF", "S", "S", "S", "S", "S"],
        ["F", "S", "S", "S", "S", "S"],
        ["F", "S", "S", "S", "S", "S"],
    ]


def test_grandfather_is_the_first_father_dated_in_the_month() -> None:
    # Apr 29 (Mon) is an April father; May 1 (Wed) is only a son: its week already has a
    # father. The first father dated in May is May 6.
    result = gfs(runs(mon_to_sat(APRIL_1, 6)), **EVERY_TIER)
    assert grid(result, APRIL_1, 6) == [
        *DESIGN,
        ["F", "S", "S", "S", "S", "S"],
        ["GF", "S", "S", "S", "S", "S"],
    ]
    assert codes(result)["2024-05-01"] == "S"


# --------------------------------------------------------------------------------------
# father_weekday


@pytest.mark.parametrize(
    ("weekday", "expected"),
    [
        # Friday: weeks Fri..Thu; Apr 1 (Mon) opens the week of Fri Mar 29.
        (
            4,
            [
                ["GF", "S", "S", "S", "F", "S"],
                ["S", "S", "S", "S", "F", "S"],
                ["S", "S", "S", "S", "F", "S"],
                ["S", "S", "S", "S", "F", "S"],
            ],
        ),
        # Wednesday: Apr 1 opens the week of Wed Mar 27.
        (
            2,
            [
                ["GF", "S", "F", "S", "S", "S"],
                ["S", "S", "F", "S", "S", "S"],
                ["S", "S", "F", "S", "S", "S"],
                ["S", "S", "F", "S", "S", "S"],
            ],
        ),
        # Sunday: never run, so Monday is the first of every Sun..Sat week: the DESIGN table.
        (6, DESIGN),
        (0, DESIGN),
    ],
)
def test_father_weekday(weekday: int, expected: list[list[str]]) -> None:
    result = gfs(runs(mon_to_sat(APRIL_1, 4)), father_weekday=weekday, **EVERY_TIER)
    assert grid(result, APRIL_1, 4) == expected


# --------------------------------------------------------------------------------------
# Yearly


def test_yearly_is_the_first_grandfather_of_the_year() -> None:
    # Daily at 01:00 UTC, Sat 2024-12-28 .. Sun 2025-01-12. Weeks start Monday.
    # 12-28: first of its week, first father of December, first grandfather of 2024.
    # 12-30 (Mon): father; December has its grandfather. 01-01 (Wed): son only.
    # 01-06 (Mon): first father dated in January -> grandfather -> first of 2025 -> yearly.
    result = gfs(runs(days(date(2024, 12, 28), 16), zone=UTC), zone=UTC, yearly=-1, **EVERY_TIER)
    special = {day: label for day, label in codes(result).items() if label != "S"}
    assert special == {"2024-12-28": "YGF", "2024-12-30": "F", "2025-01-06": "YGF"}
    assert codes(result)["2025-01-01"] == "S"


def test_yearly_on_a_monday_new_year() -> None:
    # 2024-01-01 is a Monday: son, father, grandfather and yearly at once.
    result = gfs(runs(days(date(2023, 12, 25), 15), zone=UTC), zone=UTC, yearly=-1, **EVERY_TIER)
    special = {day: label for day, label in codes(result).items() if label != "S"}
    assert special == {"2023-12-25": "YGF", "2024-01-01": "YGF", "2024-01-08": "F"}
    newest_year = next(kept for kept in result.keep if kept.generation.id == "2024-01-01")
    assert newest_year.labels == ("yearly", "grandfather", "father", "son")
    assert newest_year.reasons == ("son", "father", "grandfather", "yearly")


def test_yearly_count_keeps_the_newest_years() -> None:
    # First Monday of January each year, 2019..2024, plus one other day each.
    firsts = [date(2019, 1, 7), date(2020, 1, 6), date(2021, 1, 4), date(2022, 1, 3)]
    firsts += [date(2023, 1, 2), date(2024, 1, 1)]
    extras = [day + timedelta(days=2) for day in firsts]
    result = gfs(runs(sorted(firsts + extras), zone=UTC), zone=UTC, yearly=2)
    assert reasons(result) == {
        "2024-01-03": ("newest",),
        "2024-01-01": ("yearly",),
        "2023-01-02": ("yearly",),
    }


# --------------------------------------------------------------------------------------
# Counts: each tier keeps its N newest members

FOUR_WEEKS = mon_to_sat(APRIL_1, 4)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # The classic-gfs policy: 6 sons, 4 fathers, 12 grandfathers.
        (
            {"sons": 6, "fathers": 4, "grandfathers": 12},
            {
                "2024-04-27": ("son",),
                "2024-04-26": ("son",),
                "2024-04-25": ("son",),
                "2024-04-24": ("son",),
                "2024-04-23": ("son",),
                "2024-04-22": ("son", "father"),
                "2024-04-15": ("father",),
                "2024-04-08": ("father",),
                "2024-04-01": ("father", "grandfather"),
            },
        ),
        ({"sons": 3}, {"2024-04-27": ("son",), "2024-04-26": ("son",), "2024-04-25": ("son",)}),
        ({"sons": 1}, {"2024-04-27": ("son",)}),
        # The newest is not a father: the planner keeps it anyway, as `newest`.
        (
            {"fathers": 2},
            {"2024-04-27": ("newest",), "2024-04-22": ("father",), "2024-04-15": ("father",)},
        ),
        (
            {"fathers": -1},
            {
                "2024-04-27": ("newest",),
                "2024-04-22": ("father",),
                "2024-04-15": ("father",),
                "2024-04-08": ("father",),
                "2024-04-01": ("father",),
            },
        ),
        ({"grandfathers": 1}, {"2024-04-27": ("newest",), "2024-04-01": ("grandfather",)}),
        # More than there are: all of them.
        ({"fathers": 9, "grandfathers": 5}, None),
    ],
)
def test_tier_counts(counts: dict[str, int], expected: dict[str, tuple[str, ...]] | None) -> None:
    result = gfs(runs(FOUR_WEEKS), **counts)
    if expected is None:
        expected = {
            "2024-04-27": ("newest",),
            "2024-04-22": ("father",),
            "2024-04-15": ("father",),
            "2024-04-08": ("father",),
            "2024-04-01": ("father", "grandfather"),
        }
    assert reasons(result) == expected
    assert kept_ids(result) == sorted(expected, reverse=True)
    assert pruned_ids(result) == sorted(
        (day.isoformat() for day in FOUR_WEEKS if day.isoformat() not in expected), reverse=True
    )


@pytest.mark.parametrize(
    ("counts", "first_monday_labels", "tuesday_labels"),  # Tuesday Apr 23
    [
        ({"sons": 6, "fathers": 4, "grandfathers": 12}, ("grandfather", "father", "son"), ("son",)),
        ({"sons": -1}, ("son",), ("son",)),
        # Only tiers in use are labels: no son label when sons = 0.
        ({"fathers": -1, "grandfathers": -1}, ("grandfather", "father"), None),
        ({"grandfathers": -1}, ("grandfather",), None),
    ],
)
def test_labels_list_only_the_tiers_in_use(
    counts: dict[str, int],
    first_monday_labels: tuple[str, ...],
    tuesday_labels: tuple[str, ...] | None,
) -> None:
    result = gfs(runs(FOUR_WEEKS), **counts)
    labels = {kept.generation.id: kept.labels for kept in result.keep}
    assert labels["2024-04-01"] == first_monday_labels
    assert labels.get("2024-04-23") == tuesday_labels
    # The newest kept only as `newest` gets the labels of its roles in use (none here).
    if counts.get("sons", 0) == 0:
        assert labels["2024-04-27"] == ()


# --------------------------------------------------------------------------------------
# Month ends and leap years


@pytest.mark.parametrize(
    ("start", "count", "weekday", "special"),
    [
        # Leap year: Feb 29 2024 is a Thursday, its own son; March's grandfather is Mon Mar 4.
        (date(2024, 2, 26), 10, 0, {"2024-02-26": "GF", "2024-03-04": "GF"}),
        # Weeks from Thursday: Feb 29 is a father; February has its grandfather (Feb 27), and
        # March has none before Thu Mar 7.
        (
            date(2024, 2, 27),
            11,
            3,
            {"2024-02-27": "GF", "2024-02-29": "F", "2024-03-07": "GF"},
        ),
        # Not a leap year: Feb 28 2023 (Tue), Mar 1 (Wed) a son, Mar 6 (Mon) the grandfather.
        (date(2023, 2, 27), 9, 0, {"2023-02-27": "GF", "2023-03-06": "GF"}),
        # Mon Jul 31 2023 is a father, not a grandfather (July has Jul 24); Aug 7 is.
        (date(2023, 7, 24), 17, 0, {"2023-07-24": "GF", "2023-07-31": "F", "2023-08-07": "GF"}),
        # Month ending on a Sunday: Mon Sep 30 2024 father of September only.
        (date(2024, 9, 23), 15, 0, {"2024-09-23": "GF", "2024-09-30": "F", "2024-10-07": "GF"}),
    ],
)
def test_month_ends_and_leap_years(
    start: date, count: int, weekday: int, special: dict[str, str]
) -> None:
    result = gfs(runs(days(start, count), zone=UTC), zone=UTC, father_weekday=weekday, **EVERY_TIER)
    every = codes(result)
    assert len(every) == count  # one son per day, so all are kept
    assert {day: label for day, label in every.items() if label != "S"} == special


def test_leap_day_is_a_day_of_its_own() -> None:
    # Two runs on Feb 29 and one on Mar 1: the first of Feb 29 is the son.
    generations = [
        Generation("feb29-early", datetime(2024, 2, 29, 1, 0, tzinfo=UTC)),
        Generation("feb29-late", datetime(2024, 2, 29, 23, 0, tzinfo=UTC)),
        Generation("mar01", datetime(2024, 3, 1, 0, 30, tzinfo=UTC)),
    ]
    result = gfs(generations, zone=UTC, sons=-1)
    assert reasons(result) == {"mar01": ("son",), "feb29-early": ("son",)}
    assert pruned_ids(result) == ["feb29-late"]


# --------------------------------------------------------------------------------------
# Several runs a day, local days, protected generations


def test_son_is_the_first_run_of_the_day_not_the_last() -> None:
    generations = runs(days(APRIL_1, 3), at=time(1, 0)) + [
        Generation(f"{day.isoformat()}-pm", datetime.combine(day, time(13, 0), tzinfo=BRUSSELS))
        for day in days(APRIL_1, 3)
    ]
    result = gfs(generations, sons=-1)
    assert reasons(result) == {
        "2024-04-03-pm": ("newest",),
        "2024-04-03": ("son",),
        "2024-04-02": ("son",),
        "2024-04-01": ("son",),
    }
    assert pruned_ids(result) == ["2024-04-02-pm", "2024-04-01-pm"]


def test_days_are_local_days_of_the_zone() -> None:
    # 21:30Z and 22:30Z on Apr 1: one UTC day, but 23:30 Apr 1 and 00:30 Apr 2 in Brussels.
    generations = [
        Generation("late", datetime(2024, 4, 1, 22, 30, tzinfo=UTC)),
        Generation("early", datetime(2024, 4, 1, 21, 30, tzinfo=UTC)),
    ]
    assert reasons(gfs(generations, zone=BRUSSELS, sons=-1)) == {
        "late": ("son",),
        "early": ("son",),
    }
    assert reasons(gfs(generations, zone=UTC, sons=-1)) == {
        "late": ("newest",),
        "early": ("son",),
    }


def test_protected_generations_take_no_role() -> None:
    generations = [
        *runs(FOUR_WEEKS),
        # Earlier than the 01:00 runs of their days: would be the son/father otherwise.
        Generation("P-apr01", datetime(2024, 4, 1, 0, 30, tzinfo=BRUSSELS), protected=True),
        Generation("P-apr08", datetime(2024, 4, 8, 0, 30, tzinfo=BRUSSELS), protected=True),
    ]
    result = gfs(generations, **EVERY_TIER)
    assert grid(result, APRIL_1, 4) == DESIGN
    protected = [kept for kept in result.keep if kept.generation.protected]
    assert [(kept.generation.id, kept.reasons, kept.labels) for kept in protected] == [
        ("P-apr08", ("protected",), ()),
        ("P-apr01", ("protected",), ()),
    ]


def test_protected_generations_are_not_counted() -> None:
    generations = [
        *runs(FOUR_WEEKS),
        Generation("P", datetime(2024, 4, 27, 12, 0, tzinfo=BRUSSELS), protected=True),
        Generation("P-monday", datetime(2024, 4, 22, 0, 30, tzinfo=BRUSSELS), protected=True),
    ]
    result = gfs(generations, sons=2, fathers=1)
    assert reasons(result) == {
        "P": ("protected",),
        "2024-04-27": ("son",),
        "2024-04-26": ("son",),
        "2024-04-22": ("father",),
        "P-monday": ("protected",),
    }
