"""Calendar period keys of local (wall-clock) times, as the tools compute them.

Each key function maps a local datetime to an int that is equal exactly for the times in
the same period. Wall-clock based, like strftime in borg/PBS and Go's time fields in restic:
the repeated hour of a DST fall-back is one hourly period.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from operator import methodcaller

PeriodKey = Callable[[datetime], int]


@dataclass(frozen=True)
class Timeline:
    """The times of the generations to plan, newest first, in UTC.

    UTC datetimes share one tzinfo, so sorting and comparing them is cheap; wall-clock
    times in `zone` are computed only where a calendar period is asked for.
    """

    utc: Sequence[datetime]
    zone: tzinfo

    def __len__(self) -> int:
        return len(self.utc)

    def local(self, index: int) -> datetime:
        return self.utc[index].astimezone(self.zone)

    def locals(self) -> Iterator[datetime]:
        """Wall-clock times in timeline order, computed lazily."""
        return map(methodcaller("astimezone", self.zone), self.utc)

    def keys(self, key: PeriodKey) -> Iterator[int]:
        """The period key of every generation in timeline order, computed lazily."""
        return map(key, self.locals())


def second_key(local: datetime) -> int:
    return local.toordinal() * 86400 + local.hour * 3600 + local.minute * 60 + local.second


def hour_key(local: datetime) -> int:
    return local.toordinal() * 24 + local.hour


def day_key(local: datetime) -> int:
    return local.toordinal()


def iso_week_key(local: datetime) -> int:
    """ISO 8601 week: weeks start on Monday and belong to the ISO year (%G-%V)."""
    year, week, _ = local.isocalendar()
    return year * 100 + week


def month_key(local: datetime) -> int:
    return local.year * 12 + local.month


def year_key(local: datetime) -> int:
    return local.year


def week_starting_key(weekday: int) -> PeriodKey:
    """Weeks that start on `weekday` (0 = Monday): the key is the ordinal of the start day."""

    def key(local: datetime) -> int:
        ordinal = local.toordinal()
        return ordinal - (local.weekday() - weekday) % 7

    return key
