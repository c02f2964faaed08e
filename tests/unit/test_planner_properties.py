"""Properties of plan() for every semantics, over random generations and rules.

Generations are aware datetimes in several zones (some sharing an instant, some
protected); rules have counts in -1..5 with at least one not 0. The checks are written
from the definitions, never by asking the planner twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfs_backup.retention import (
    Generation,
    Plan,
    RetentionRules,
    Semantics,
    parse_keep_within,
    plan,
)

pytestmark = pytest.mark.unit

UTC = timezone.utc
ZONES: list[tzinfo] = [
    UTC,
    ZoneInfo("Europe/Brussels"),
    ZoneInfo("America/New_York"),
    ZoneInfo("Australia/Lord_Howe"),  # 30-minute DST shift
    ZoneInfo("Asia/Kathmandu"),  # +05:45
]
# Near DST changes, a leap day, an ISO-year boundary, and an ordinary summer.
ANCHORS = [
    datetime(2024, 3, 29, 18, tzinfo=UTC),
    datetime(2024, 10, 25, 18, tzinfo=UTC),
    datetime(2024, 2, 26, tzinfo=UTC),
    datetime(2024, 12, 26, tzinfo=UTC),
    datetime(2023, 6, 1, tzinfo=UTC),
]
STEPS = [
    timedelta(seconds=1),
    timedelta(minutes=7),
    timedelta(minutes=30),
    timedelta(hours=1),
    timedelta(hours=5),
    timedelta(days=1),
    timedelta(days=9),
    timedelta(days=40),
]
SETTINGS = settings(max_examples=200, deadline=None)

ROLES = ("son", "father", "grandfather", "yearly")
LABEL_ORDER = ("yearly", "grandfather", "father", "son")
RULE_LABEL = {
    "keep-daily": "son",
    "keep-weekly": "father",
    "keep-monthly": "grandfather",
    "keep-yearly": "yearly",
}
RULE_FIELDS = {
    "keep-last": "keep_last",
    "keep-hourly": "keep_hourly",
    "keep-daily": "keep_daily",
    "keep-weekly": "keep_weekly",
    "keep-monthly": "keep_monthly",
    "keep-yearly": "keep_yearly",
}
WITHIN_TEXTS = {
    "borg": ["1H", "26H", "2d", "1w", "1m"],
    "restic": ["1h", "30h", "2d", "1m", "1y2m3d3h", "1d12h"],
}


@dataclass
class Case:
    generations: list[Generation]
    rules: RetentionRules
    now: datetime
    zone: tzinfo


@st.composite
def generations(draw: st.DrawFn) -> list[Generation]:
    anchor = draw(st.sampled_from(ANCHORS))
    step = draw(st.sampled_from(STEPS))
    ticks = draw(st.lists(st.integers(0, draw(st.integers(1, 60))), max_size=24))
    result = []
    for index, tick in enumerate(ticks):
        zone = draw(st.sampled_from(ZONES))
        protected = draw(st.integers(0, 7)) == 0
        result.append(Generation(f"g{index}", (anchor + tick * step).astimezone(zone), protected))
    return result


COUNTS = st.integers(-1, 5)


@st.composite
def rules_for(draw: st.DrawFn, semantics: Semantics) -> RetentionRules:
    if semantics == "gfs":
        tiers = draw(st.tuples(COUNTS, COUNTS, COUNTS, COUNTS).filter(any))
        return RetentionRules(
            semantics="gfs",
            sons=tiers[0],
            fathers=tiers[1],
            grandfathers=tiers[2],
            yearly=tiers[3],
            father_weekday=draw(st.integers(0, 6)),
        )
    counts = draw(st.tuples(*[COUNTS] * 6).filter(any))
    within = None
    if semantics in WITHIN_TEXTS and draw(st.booleans()):
        within = parse_keep_within(draw(st.sampled_from(WITHIN_TEXTS[semantics])), semantics)
    return RetentionRules(
        semantics,
        keep_last=counts[0],
        keep_hourly=counts[1],
        keep_daily=counts[2],
        keep_weekly=counts[3],
        keep_monthly=counts[4],
        keep_yearly=counts[5],
        keep_within=within,
    )


@st.composite
def cases(draw: st.DrawFn, semantics: Semantics) -> Case:
    gens = draw(generations())
    rules = draw(rules_for(semantics))
    if gens:
        # Around the generations: before some, after all, or exactly on one.
        pivot = draw(st.sampled_from(gens)).time
        now = pivot + draw(st.sampled_from([timedelta(0), timedelta(seconds=1), timedelta(days=3)]))
        now = now - draw(st.sampled_from([timedelta(0), timedelta(hours=2)]))
    else:
        now = ANCHORS[0]
    now = now.astimezone(draw(st.sampled_from(ZONES)))
    return Case(gens, rules, now, draw(st.sampled_from(ZONES)))


# --------------------------------------------------------------------------------------
# Reference facts computed from the definitions


def newest_first(gens: Sequence[Generation]) -> list[Generation]:
    """Time descending; among equal instants, input order counts as newest first."""
    position = {id(gen): index for index, gen in enumerate(gens)}
    return sorted(gens, key=lambda gen: (-gen.time.timestamp(), position[id(gen)]))


def unprotected(gens: Sequence[Generation]) -> list[Generation]:
    return [gen for gen in newest_first(gens) if not gen.protected]


def wall(gen: Generation, zone: tzinfo) -> datetime:
    return gen.time.astimezone(zone)


PeriodOf = Callable[[datetime], object]
PERIODS: dict[str, PeriodOf] = {
    "keep-hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "keep-daily": lambda t: (t.year, t.month, t.day),
    "keep-weekly": lambda t: t.isocalendar()[:2],
    "keep-monthly": lambda t: (t.year, t.month),
    "keep-yearly": lambda t: t.year,
}


def period_of(rule: str, semantics: Semantics, gen: Generation, zone: tzinfo) -> object:
    if rule == "keep-last":
        if semantics == "borg":  # keep-secondly: the local wall-clock second
            return wall(gen, zone).replace(microsecond=0, tzinfo=None)
        return id(gen)
    return PERIODS[rule](wall(gen, zone))


def gfs_roles(gens: Sequence[Generation], zone: tzinfo, weekday: int) -> dict[int, set[str]]:
    """Roles by id(): first of day (son), of week (father), first father of a month..."""
    roles: dict[int, set[str]] = {}
    days: set[object] = set()
    weeks: set[object] = set()
    father_months: set[object] = set()
    grandfather_years: set[object] = set()
    for gen in reversed(unprotected(gens)):  # oldest first
        local = wall(gen, zone)
        mine = roles.setdefault(id(gen), set())
        day = local.date()
        week_start = day - timedelta(days=(day.weekday() - weekday) % 7)
        if day not in days:
            days.add(day)
            mine.add("son")
        if week_start not in weeks:
            weeks.add(week_start)
            mine.add("father")
            if (local.year, local.month) not in father_months:
                father_months.add((local.year, local.month))
                mine.add("grandfather")
                if local.year not in grandfather_years:
                    grandfather_years.add(local.year)
                    mine.add("yearly")
    return roles


# --------------------------------------------------------------------------------------
# Properties common to every semantics


def check_common(case: Case, result: Plan) -> None:
    inputs = Counter(id(gen) for gen in case.generations)
    outputs = Counter(id(kept.generation) for kept in result.keep)
    outputs.update(id(gen) for gen in result.prune)
    # keep and prune are a partition of the inputs, by identity.
    assert outputs == inputs
    # newest first, equal instants in input order.
    position = {id(gen): index for index, gen in enumerate(case.generations)}
    for listed in ([kept.generation for kept in result.keep], result.prune):
        keys = [(-gen.time.timestamp(), position[id(gen)]) for gen in listed]
        assert keys == sorted(keys)
    free = unprotected(case.generations)
    kept = {id(item.generation): item for item in result.keep}
    if free:
        assert id(free[0]) in kept, "the newest unprotected generation must be kept"
    for item in result.keep:
        assert item.reasons, "every kept generation has a reason"
        assert len(set(item.reasons)) == len(item.reasons)
        if item.generation.protected:
            assert item.reasons == ("protected",)
            assert item.labels == ()
        else:
            assert "protected" not in item.reasons
        assert list(item.labels) == [label for label in LABEL_ORDER if label in item.labels]
        if "newest" in item.reasons:
            assert item.reasons == ("newest",)
            assert item.generation is free[0]
    assert not any(gen.protected for gen in result.prune)


def check_within(case: Case, result: Plan) -> None:
    """borg: within `seconds` before now; restic: a prefix of the list, from the latest."""
    within = case.rules.keep_within
    flagged = {id(item.generation) for item in result.keep if "keep-within" in item.reasons}
    if within is None:
        assert not flagged
        return
    free = unprotected(case.generations)
    if case.rules.semantics == "borg":
        # In UTC: a zoned datetime minus a timedelta would move its wall clock instead.
        limit = case.now.astimezone(UTC) - timedelta(seconds=within.seconds)
        assert flagged == {id(gen) for gen in free if gen.time > limit}
        return
    # restic: a newer generation than one within is within too.
    marks = [id(gen) in flagged for gen in free]
    assert marks == sorted(marks, reverse=True)
    past = [gen for gen in free if gen.time < case.now]
    if not past:
        assert all(marks)
    else:
        latest = past[0].time
        assert id(past[0]) in flagged
        if not (within.years or within.months or within.days):
            limit = latest - timedelta(hours=within.hours)
            assert flagged == {id(gen) for gen in free if gen.time > limit}


# --------------------------------------------------------------------------------------
# gfs: labels and reasons follow the calendar roles exactly


@SETTINGS
@given(case=cases("gfs"))
def test_gfs_labels_and_reasons_follow_the_roles(case: Case) -> None:
    result = plan(case.generations, case.rules, case.now, case.zone)
    check_common(case, result)
    rules = case.rules
    roles = gfs_roles(case.generations, case.zone, rules.father_weekday)
    counts = dict(
        zip(ROLES, (rules.sons, rules.fathers, rules.grandfathers, rules.yearly), strict=True)
    )
    free = unprotected(case.generations)
    kept_by: dict[str, set[int]] = {}
    for role, count in counts.items():
        members = [id(gen) for gen in free if role in roles[id(gen)]]
        kept_by[role] = set(members if count == -1 else members[: max(count, 0)])
    expected: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for gen in free:
        why = tuple(role for role in ROLES if id(gen) in kept_by[role])
        if not why and gen is free[0]:
            why = ("newest",)
        if why:
            mine = roles[id(gen)]
            labels = tuple(r for r in LABEL_ORDER if r in mine and counts[r] != 0)
            expected[id(gen)] = (why, labels)
    actual = {
        id(item.generation): (item.reasons, item.labels)
        for item in result.keep
        if not item.generation.protected
    }
    assert actual == expected


# --------------------------------------------------------------------------------------
# pbs, borg, restic: reasons match the periods they claim


def rule_of(reason: str) -> str:
    return reason.split("[")[0]


@pytest.mark.parametrize("semantics", ["pbs", "borg", "restic"])
@SETTINGS
@given(data=st.data())
def test_keep_rules_are_consistent_with_the_calendar(
    semantics: Semantics, data: st.DataObject
) -> None:
    case = data.draw(cases(semantics))
    result = plan(case.generations, case.rules, case.now, case.zone)
    check_common(case, result)
    if semantics != "pbs":
        check_within(case, result)
    free = unprotected(case.generations)
    index = {id(gen): n for n, gen in enumerate(free)}
    counts = {rule: getattr(case.rules, field) for rule, field in RULE_FIELDS.items()}
    per_rule: Counter[str] = Counter()
    periods_per_rule: dict[str, list[object]] = {}
    for item in result.keep:
        gen = item.generation
        if gen.protected:
            continue
        # Labels are the calendar labels of the keep-* reasons, nothing else.
        mapped = {RULE_LABEL[rule_of(r)] for r in item.reasons if rule_of(r) in RULE_LABEL}
        assert set(item.labels) == mapped
        if semantics in ("pbs", "borg"):
            assert len(item.reasons) == 1, "pbs and borg give one reason each"
        for reason in item.reasons:
            if reason in ("newest", "keep-within"):
                continue
            rule = rule_of(reason)
            assert counts[rule] != 0, f"{reason} from a rule that is off"
            per_rule[rule] += 1
            period = period_of(rule, semantics, gen, case.zone)
            periods_per_rule.setdefault(rule, []).append(period)
            n = index[id(gen)]
            if reason.endswith("[oldest]"):
                assert semantics != "pbs"
                assert n == len(free) - 1, "[oldest] is the oldest unprotected generation"
            elif semantics != "pbs" or rule in (
                "keep-last",
                "keep-hourly",
                "keep-daily",
                "keep-weekly",
            ):
                # The newest of its run of equal periods (for pbs: of its whole period).
                newer = free[:n] if semantics == "pbs" else free[n - 1 : n]
                assert all(
                    period_of(rule, semantics, other, case.zone) != period for other in newer
                ), f"{reason} on a generation that is not the newest of its period"
    for rule, used in per_rule.items():
        if counts[rule] > 0:
            assert used <= counts[rule], f"{rule} kept more than its count"
    if semantics == "pbs":
        for rule, periods in periods_per_rule.items():
            assert len(periods) == len(set(periods)), f"pbs {rule} kept a period twice"
    if semantics == "restic":
        # Unlimited buckets keep the newest of every run of equal periods.
        for rule, count in counts.items():
            if count != -1:
                continue
            starts = [
                id(gen)
                for n, gen in enumerate(free)
                if n == 0
                or period_of(rule, semantics, gen, case.zone)
                != period_of(rule, semantics, free[n - 1], case.zone)
            ]
            reasons = {id(item.generation): item.reasons for item in result.keep}
            assert all(rule in reasons.get(start, ()) for start in starts)
