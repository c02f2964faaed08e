"""The keep-* rule families of Proxmox (PBS/PVE), borg 1.x and restic, each exactly.

Every function takes the generations sorted newest first with their local times and
returns {index: reasons} for the kept ones. Differences that matter (see README):

- pbs: rules run in order last, hourly, daily, weekly, monthly, yearly; a period that
  already holds a generation kept by an earlier rule is skipped; inside a rule the other
  generations of a period are marked for removal, so later rules cannot pick them; one
  reason per generation; no keep-within; no "keep the oldest".
- borg: rules run within, last (= secondly), hourly, ..., yearly; a generation kept by an
  earlier rule is not counted again but its period is still used up; when a rule runs out
  of generations before its count, the oldest generation is kept as `<rule>[oldest]`;
  keep-within is measured from now.
- restic (0.16+): every rule looks at every generation independently, so one generation can
  carry several reasons; a rule with counts left also keeps the oldest generation (as
  `<rule>[oldest]` when its period was already kept); keep-within is measured from the
  newest generation not in the future, with calendar months (Go's AddDate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone, tzinfo

from gfs_backup.retention.calendar import (
    PeriodKey,
    day_key,
    hour_key,
    iso_week_key,
    month_key,
    second_key,
    year_key,
)
from gfs_backup.retention.model import UNLIMITED, Generation, KeepWithin, RetentionRules

Reasons = dict[int, list[str]]
IndexKey = Callable[[int], int]

_PERIOD_RULES: tuple[tuple[str, PeriodKey], ...] = (
    ("keep-hourly", hour_key),
    ("keep-daily", day_key),
    ("keep-weekly", iso_week_key),
    ("keep-monthly", month_key),
    ("keep-yearly", year_key),
)


def _rule_counts(rules: RetentionRules) -> dict[str, int]:
    return {
        "keep-last": rules.keep_last,
        "keep-hourly": rules.keep_hourly,
        "keep-daily": rules.keep_daily,
        "keep-weekly": rules.keep_weekly,
        "keep-monthly": rules.keep_monthly,
        "keep-yearly": rules.keep_yearly,
    }


def _index_key(local: Sequence[datetime], key: PeriodKey) -> IndexKey:
    cache: dict[int, int] = {}

    def by_index(index: int) -> int:
        value = cache.get(index)
        if value is None:
            value = cache[index] = key(local[index])
        return value

    return by_index


def _identity(index: int) -> int:
    return index


def _ordered_rules(
    rules: RetentionRules, local: Sequence[datetime], last_key: IndexKey
) -> list[tuple[str, int, IndexKey]]:
    counts = _rule_counts(rules)
    ordered = [("keep-last", counts["keep-last"], last_key)]
    ordered += [(name, counts[name], _index_key(local, key)) for name, key in _PERIOD_RULES]
    return [(name, count, key) for name, count, key in ordered if count != 0]


def pbs_keep(
    gens: Sequence[Generation],
    local: Sequence[datetime],
    rules: RetentionRules,
) -> Reasons:
    """Proxmox Backup Server / Proxmox VE prune (keep-last is one per backup time)."""
    keep: Reasons = {}
    removed: set[int] = set()
    for name, count, key in _ordered_rules(rules, local, _identity):
        already = {key(index) for index in keep}
        included: set[int] = set()
        for index in range(len(gens)):
            if index in keep or index in removed:
                continue
            period = key(index)
            if period in already:
                continue
            if period in included:
                removed.add(index)
                continue
            if count != UNLIMITED and len(included) >= count:
                break
            included.add(period)
            keep[index] = [name]
    return keep


def borg_keep(
    gens: Sequence[Generation], local: Sequence[datetime], rules: RetentionRules, now: datetime
) -> Reasons:
    """borg 1.x prune (keep-last is keep-secondly; keep-within counts back from now)."""
    keep: Reasons = {}
    if rules.keep_within is not None:
        # In UTC: on a zoned `now`, Python's aware arithmetic would move the wall clock.
        limit = now.astimezone(timezone.utc) - timedelta(seconds=rules.keep_within.seconds)
        for index, gen in enumerate(gens):
            if gen.time > limit:
                keep[index] = ["keep-within"]
    for name, count, key in _ordered_rules(rules, local, _index_key(local, second_key)):
        last_period: int | None = None
        kept_here = 0
        index = -1
        for index in range(len(gens)):
            period = key(index)
            if period == last_period:
                continue
            last_period = period
            if index not in keep:
                keep[index] = [name]
                kept_here += 1
                if kept_here == count:
                    break
        if index >= 0 and kept_here < count and index not in keep:
            keep[index] = [f"{name}[oldest]"]
    return keep


def restic_keep(
    gens: Sequence[Generation],
    local: Sequence[datetime],
    rules: RetentionRules,
    now: datetime,
    zone: tzinfo,
) -> Reasons:
    """restic forget (each rule independent; keep-within from the newest generation)."""
    keep: Reasons = {}
    if not gens:
        return keep
    buckets = _ordered_rules(rules, local, _identity)
    remaining = [count for _, count, _ in buckets]
    last_period: list[int | None] = [None] * len(buckets)
    limit = _restic_within_limit(gens, now, rules.keep_within, zone)
    oldest = len(gens) - 1
    for index, gen in enumerate(gens):
        reasons: list[str] = []
        if limit is not None and gen.time > limit:
            reasons.append("keep-within")
        for slot, (name, _, key) in enumerate(buckets):
            if remaining[slot] == 0:
                continue
            period = key(index)
            if period != last_period[slot]:
                reasons.append(name)
            elif index == oldest:
                reasons.append(f"{name}[oldest]")
            else:
                continue
            last_period[slot] = period
            if remaining[slot] > 0:
                remaining[slot] -= 1
        if reasons:
            keep[index] = reasons
    return keep


def _restic_within_limit(
    gens: Sequence[Generation], now: datetime, within: KeepWithin | None, zone: tzinfo
) -> datetime | None:
    """latest.AddDate(-y, -m, -d).Add(-h) as Go computes it, with latest in `zone`.

    latest is the newest generation before `now`; with none, everything is within. restic
    reads a snapshot time into Go's Local zone when its offset matches (time.Parse), so the
    calendar step keeps the wall clock across a DST change, like restic run in `zone`.
    """
    if within is None:
        return None
    latest = next((gen.time for gen in gens if gen.time < now), None)
    if latest is None:
        return datetime.min.replace(tzinfo=timezone.utc)
    try:
        shifted = _go_add_date(latest.astimezone(zone), -within.years, -within.months, -within.days)
        return shifted - timedelta(hours=within.hours)
    except (OverflowError, ValueError):  # before year 1 (e.g. 9999y): everything is within
        return datetime.min.replace(tzinfo=timezone.utc)


def _go_add_date(stamp: datetime, years: int, months: int, days: int) -> datetime:
    """Go's Time.AddDate in stamp's zone, returned in UTC.

    Add to the fields, normalise overflow (Jan 31 + 1m = Mar 3), then place the wall time
    in the zone as Go's Date does: offset at (wall - offset at wall-as-UTC).
    """
    zone = stamp.tzinfo
    month_index = stamp.year * 12 + (stamp.month - 1) + years * 12 + months
    year, month0 = divmod(month_index, 12)
    first = stamp.replace(year=year, month=month0 + 1, day=1, tzinfo=timezone.utc)
    wall = first + timedelta(days=stamp.day - 1 + days)
    guess = wall.astimezone(zone).utcoffset() or timedelta(0)
    return wall - ((wall - guess).astimezone(zone).utcoffset() or timedelta(0))
