"""The classic grandfather-father-son rotation (semantics `gfs`).

Roles are given in time order, to the first generation of each period, so a missed run
never breaks the rotation: the next generation of the period takes the role.

- son: the first generation of each calendar day;
- father: the first generation of each week, weeks starting on `father_weekday`;
- grandfather: the first father dated in each calendar month;
- yearly: the first grandfather dated in each calendar year.

A father is also a son, a grandfather also a father, and so on; only the tiers the policy
uses (count not 0) appear as labels. Each tier keeps its N newest members (-1 = all); a
generation kept by several tiers lists every reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from gfs_backup.retention.calendar import day_key, month_key, week_starting_key, year_key
from gfs_backup.retention.model import (
    FATHER,
    GRANDFATHER,
    SON,
    UNLIMITED,
    YEARLY,
    RetentionRules,
)


def classic_roles(local: Sequence[datetime], father_weekday: int) -> dict[int, list[str]]:
    """{index: roles} of the generations that hold one; `local` is sorted newest first.

    Only the first generation of a day can hold a role, so the dict stays small.
    """
    roles: dict[int, list[str]] = {}
    week_key = week_starting_key(father_weekday)
    seen_day: set[int] = set()
    seen_week: set[int] = set()
    seen_month: set[int] = set()
    seen_year: set[int] = set()
    previous_day = None
    for index in range(len(local) - 1, -1, -1):
        stamp = local[index]
        day = day_key(stamp)
        if day == previous_day:  # fast path: same day as the previous (older) generation
            continue
        previous_day = day
        if day in seen_day:  # a fall-back at midnight repeats the end of the day before
            continue
        seen_day.add(day)
        own = roles[index] = [SON]
        week = week_key(stamp)
        if week in seen_week:
            continue
        seen_week.add(week)
        own.append(FATHER)
        month = month_key(stamp)
        if month in seen_month:
            continue
        seen_month.add(month)
        own.append(GRANDFATHER)
        year = year_key(stamp)
        if year not in seen_year:
            seen_year.add(year)
            own.append(YEARLY)
    return roles


def classic_keep(
    local: Sequence[datetime], rules: RetentionRules
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Return ({index: reasons}, {index: labels}) of the kept generations."""
    roles = classic_roles(local, rules.father_weekday)
    tiers = (
        (SON, rules.sons),
        (FATHER, rules.fathers),
        (GRANDFATHER, rules.grandfathers),
        (YEARLY, rules.yearly),
    )
    keep: dict[int, list[str]] = {}
    newest_first = sorted(roles)
    for tier, count in tiers:
        if count == 0:
            continue
        taken = 0
        for index in newest_first:
            if tier not in roles[index]:
                continue
            keep.setdefault(index, []).append(tier)
            taken += 1
            if taken == count and count != UNLIMITED:
                break
    used = {tier for tier, count in tiers if count != 0}
    labels = {index: [role for role in roles.get(index, ()) if role in used] for index in keep}
    return keep, labels
