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

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from gfs_backup.retention.calendar import (
    PeriodKey,
    Timeline,
    day_key,
    hour_key,
    iso_week_key,
    month_key,
    second_key,
    year_key,
)
from gfs_backup.retention.model import UNLIMITED, KeepWithin, RetentionRules

Reasons = dict[int, list[str]]


@dataclass(frozen=True)
class Rule:
    """One keep-* rule; `period` None means every generation is a period of its own."""

    name: str
    count: int
    period: PeriodKey | None

    def keys(self, timeline: Timeline) -> Iterator[int]:
        """The period of each generation, newest first, computed as the loop asks."""
        if self.period is None:
            return iter(range(len(timeline)))
        return timeline.keys(self.period)

    def key_at(self, timeline: Timeline, index: int) -> int:
        return index if self.period is None else self.period(timeline.local(index))


_PERIODS: tuple[tuple[str, PeriodKey], ...] = (
    ("keep-hourly", hour_key),
    ("keep-daily", day_key),
    ("keep-weekly", iso_week_key),
    ("keep-monthly", month_key),
    ("keep-yearly", year_key),
)


def _ordered_rules(rules: RetentionRules, last_period: PeriodKey | None) -> list[Rule]:
    """The rules in use, in the tools' order: last, hourly, daily, ..., yearly."""
    counts = (
        rules.keep_hourly,
        rules.keep_daily,
        rules.keep_weekly,
        rules.keep_monthly,
        rules.keep_yearly,
    )
    ordered = [Rule("keep-last", rules.keep_last, last_period)]
    ordered += [Rule(name, count, key) for (name, key), count in zip(_PERIODS, counts, strict=True)]
    return [rule for rule in ordered if rule.count != 0]


def pbs_keep(timeline: Timeline, rules: RetentionRules) -> Reasons:
    """Proxmox Backup Server / Proxmox VE prune (keep-last is one per backup time)."""
    keep: Reasons = {}
    removed: set[int] = set()
    for rule in _ordered_rules(rules, None):
        already = {rule.key_at(timeline, index) for index in keep}
        included: set[int] = set()
        for index, period in enumerate(rule.keys(timeline)):
            if index in keep or index in removed or period in already:
                continue
            if period in included:
                removed.add(index)
                continue
            if rule.count != UNLIMITED and len(included) >= rule.count:
                break
            included.add(period)
            keep[index] = [rule.name]
    return keep


def borg_keep(timeline: Timeline, rules: RetentionRules, now: datetime) -> Reasons:
    """borg 1.x prune (keep-last is keep-secondly; keep-within counts back from now)."""
    keep: Reasons = {}
    if rules.keep_within is not None:
        # In UTC: on a zoned `now`, Python's aware arithmetic would move the wall clock.
        limit = now.astimezone(timezone.utc) - timedelta(seconds=rules.keep_within.seconds)
        for index, stamp in enumerate(timeline.utc):
            if stamp <= limit:
                break  # newest first: nothing older is within
            keep[index] = ["keep-within"]
    for rule in _ordered_rules(rules, second_key):
        last_period: int | None = None
        kept_here = 0
        index = -1
        for index, period in enumerate(rule.keys(timeline)):
            if period == last_period:
                continue
            last_period = period
            if index not in keep:
                keep[index] = [rule.name]
                kept_here += 1
                if kept_here == rule.count:
                    break
        if index >= 0 and kept_here < rule.count and index not in keep:
            keep[index] = [f"{rule.name}[oldest]"]
    return keep


def restic_keep(timeline: Timeline, rules: RetentionRules, now: datetime) -> Reasons:
    """restic forget (each rule independent; keep-within from the newest generation)."""
    keep: Reasons = {}
    buckets = _ordered_rules(rules, None)
    periods = [rule.keys(timeline) for rule in buckets]
    remaining = [rule.count for rule in buckets]
    last_period: list[int | None] = [None] * len(buckets)
    limit = _restic_within_limit(timeline, now, rules.keep_within)
    oldest = len(timeline) - 1
    for index, stamp in enumerate(timeline.utc):
        within = limit is not None and stamp > limit
        if not within and not any(remaining):
            break  # no rule can keep anything older
        reasons = ["keep-within"] if within else []
        for slot, rule in enumerate(buckets):
            if remaining[slot] == 0:
                continue  # an exhausted rule never needs another period key
            period = next(periods[slot])
            if period != last_period[slot]:
                reasons.append(rule.name)
            elif index == oldest:
                reasons.append(f"{rule.name}[oldest]")
            else:
                continue
            last_period[slot] = period
            if remaining[slot] > 0:
                remaining[slot] -= 1
        if reasons:
            keep[index] = reasons
    return keep


def _restic_within_limit(
    timeline: Timeline,
    now: datetime,
    within: KeepWithin | None,
) -> datetime | None:
    """latest.AddDate(-y, -m, -d).Add(-h) as Go computes it, with latest in the zone.

    latest is the newest generation before `now`; with none, everything is within. restic
    reads a snapshot time into Go's Local zone when its offset matches (time.Parse), so the
    calendar step keeps the wall clock across a DST change, like restic run in that zone.
    """
    if within is None:
        return None
    latest = next((index for index, stamp in enumerate(timeline.utc) if stamp < now), None)
    if latest is None:
        return datetime.min.replace(tzinfo=timezone.utc)
    try:
        shifted = _go_add_date(timeline.local(latest), -within.years, -within.months, -within.days)
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
