"""Calendar expressions in the spirit of systemd's OnCalendar=, evaluated in a time zone.

Supported: the shorthands minutely, hourly, daily, weekly, monthly, quarterly,
semiannually, yearly/annually, and the form `[WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]]`
where WEEKDAYS is a comma list of names or ranges (`Mon..Sat`), and each number field is
`*`, a number, a range `A..B`, a repetition `A/STEP` or `*/STEP`, or a comma list of those.
Missing parts default to every day and 00:00:00. A wall-clock time that a DST change skips
does not fire; a repeated one fires once, at its first occurrence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo

_SHORTHANDS = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "weekly": "Mon *-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
}
_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SEARCH_DAYS = 4 * 366 + 1  # any valid date pattern matches within four years (Feb 29)
_ITEM_RE = re.compile(r"(\*|\d+)(?:\.\.(\d+))?(?:/(\d+))?")


@dataclass(frozen=True)
class Schedule:
    """A parsed calendar expression: the allowed values of each field."""

    text: str
    weekdays: frozenset[int]
    years: frozenset[int] | None  # None = every year
    months: frozenset[int]
    days: frozenset[int]
    times: tuple[tuple[int, int, int], ...]  # sorted (hour, minute, second)

    def next_after(self, after: datetime, zone: tzinfo) -> datetime | None:
        """First time strictly after `after` (aware) that matches, in `zone`; None if never."""
        start = after.astimezone(zone).date()
        for offset in range(_SEARCH_DAYS):
            day = start + timedelta(days=offset)
            if not self._matches_day(day):
                continue
            for hour, minute, second in self.times:
                candidate = _existing_wall_time(day, hour, minute, second, zone)
                if candidate is not None and candidate > after:
                    return candidate
        return None

    def _matches_day(self, day: date) -> bool:
        return (
            day.weekday() in self.weekdays
            and day.month in self.months
            and day.day in self.days
            and (self.years is None or day.year in self.years)
        )


def _existing_wall_time(
    day: date,
    hour: int,
    minute: int,
    second: int,
    zone: tzinfo,
) -> datetime | None:
    wall = datetime(day.year, day.month, day.day, hour, minute, second)
    stamp = wall.replace(tzinfo=zone)
    round_trip = stamp.astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None)
    return stamp if round_trip == wall else None


def parse_schedule(text: str) -> Schedule:
    """Parse a calendar expression. Raises ValueError saying what is wrong and what is allowed."""
    expression = " ".join(text.split())
    normal = _SHORTHANDS.get(expression.lower(), expression)
    tokens = normal.split(" ")
    weekdays = frozenset(range(7))
    if tokens and tokens[0] and tokens[0][0].isalpha():
        weekdays = _parse_weekdays(tokens.pop(0), text)
    date_part = tokens.pop(0) if tokens and "-" in tokens[0] else "*-*-*"
    time_part = tokens.pop(0) if tokens and ":" in tokens[0] else "00:00:00"
    if tokens or not expression:
        raise ValueError(
            f"cannot read calendar expression {text!r}: expected [WEEKDAYS] [YEAR-MONTH-DAY] "
            "[HOUR:MINUTE[:SECOND]] or a shorthand such as daily, e.g. 'Mon..Sat *-*-* 01:00'"
        )
    years, months, days = _parse_date(date_part, text)
    hours, minutes, seconds = _parse_time(time_part, text)
    times = tuple(sorted((h, m, s) for h in hours for m in minutes for s in seconds))
    return Schedule(text, weekdays, years, months, days, times)


def _parse_weekdays(token: str, text: str) -> frozenset[int]:
    result: set[int] = set()
    for item in token.lower().split(","):
        first, _, last = item.partition("..")
        start = _weekday_number(first, text)
        end = _weekday_number(last, text) if last else start
        if end < start:
            raise ValueError(f"weekday range {item!r} in {text!r} runs backwards")
        result.update(range(start, end + 1))
    return frozenset(result)


def _weekday_number(name: str, text: str) -> int:
    if name in _DAY_NAMES:
        return _DAY_NAMES.index(name)
    if name in _FULL_DAY_NAMES:
        return _FULL_DAY_NAMES.index(name)
    raise ValueError(f"unknown weekday {name!r} in {text!r}: use Mon, Tue, ... Sun")


def _parse_date(
    part: str, text: str
) -> tuple[frozenset[int] | None, frozenset[int], frozenset[int]]:
    fields = part.split("-")
    if len(fields) == 2:
        fields = ["*", *fields]
    if len(fields) != 3:
        raise ValueError(f"date {part!r} in {text!r}: use YEAR-MONTH-DAY or MONTH-DAY")
    years = None if fields[0] == "*" else _parse_field(fields[0], 1970, 2199, "year", text)
    months = _parse_field(fields[1], 1, 12, "month", text)
    days = _parse_field(fields[2], 1, 31, "day", text)
    return years, months, days


def _parse_time(part: str, text: str) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    fields = part.split(":")
    if len(fields) == 2:
        fields.append("00")
    if len(fields) != 3:
        raise ValueError(f"time {part!r} in {text!r}: use HOUR:MINUTE or HOUR:MINUTE:SECOND")
    return (
        _parse_field(fields[0], 0, 23, "hour", text),
        _parse_field(fields[1], 0, 59, "minute", text),
        _parse_field(fields[2], 0, 59, "second", text),
    )


def _parse_field(field: str, low: int, high: int, what: str, text: str) -> frozenset[int]:
    values: set[int] = set()
    for item in field.split(","):
        match = _ITEM_RE.fullmatch(item)
        if not match:
            raise ValueError(f"invalid {what} {item!r} in {text!r}: use *, N, A..B or A/STEP")
        first, last, step = match.groups()
        start = low if first == "*" else int(first)
        end = int(last) if last is not None else (high if first == "*" or step else start)
        stride = int(step) if step else 1
        if not (low <= start <= high and low <= end <= high) or stride < 1 or end < start:
            raise ValueError(f"{what} {item!r} in {text!r} is outside {low}..{high}")
        values.update(range(start, end + 1, stride))
    return frozenset(values)
