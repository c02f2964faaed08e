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
    Generation,
    RetentionRules,
)


def classic_labels(local: Sequence[datetime], father_weekday: int) -> list[list[str]]:
    """Labels of each generation; `local` is sorted newest first, like the result."""
    labels: list[list[str]] = [[] for _ in local]
    week_key = week_starting_key(father_weekday)
    seen_day: set[int] = set()
    seen_week: set[int] = set()
    seen_month: set[int] = set()
    seen_year: set[int] = set()
    for index in range(len(local) - 1, -1, -1):
        stamp = local[index]
        day = day_key(stamp)
        if day in seen_day:
            continue
        seen_day.add(day)
        labels[index].append(SON)
        week = week_key(stamp)
        if week in seen_week:
            continue
        seen_week.add(week)
        labels[index].append(FATHER)
        month = month_key(stamp)
        if month in seen_month:
            continue
        seen_month.add(month)
        labels[index].append(GRANDFATHER)
        year = year_key(stamp)
        if year not in seen_year:
            seen_year.add(year)
            labels[index].append(YEARLY)
    return labels


def classic_keep(
    gens: Sequence[Generation],
    local: Sequence[datetime],
    rules: RetentionRules,
) -> tuple[dict[int, list[str]], list[list[str]]]:
    """Return ({index: reasons} of kept generations, labels of every generation)."""
    roles = classic_labels(local, rules.father_weekday)
    tiers = (
        (SON, rules.sons),
        (FATHER, rules.fathers),
        (GRANDFATHER, rules.grandfathers),
        (YEARLY, rules.yearly),
    )
    used = {tier for tier, count in tiers if count != 0}
    labels = [[role for role in own if role in used] for own in roles]
    keep: dict[int, list[str]] = {}
    for tier, count in tiers:
        if count == 0:
            continue
        taken = 0
        for index, own in enumerate(roles):
            if tier not in own:
                continue
            keep.setdefault(index, []).append(tier)
            taken += 1
            if taken == count and count != UNLIMITED:
                break
    return keep, labels
