"""Turning plans into text for people (table, calendar) and JSON for scripts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from gfs_backup.core.timeutil import format_timestamp
from gfs_backup.retention import Kept, Plan, RetentionRules
from gfs_backup.retention.model import (
    FATHER,
    GRANDFATHER,
    REASON_PROTECTED,
    SON,
    WEEKDAYS,
    YEARLY,
)

_CODES = {YEARLY: "Y", GRANDFATHER: "GF", FATHER: "F", SON: "S"}
_TIER_RULES = {
    "keep-yearly": YEARLY,
    "keep-monthly": GRANDFATHER,
    "keep-weekly": FATHER,
    "keep-daily": SON,
}
_CODE_RANK = ("Y", "GF", "F", "S", "P", "k", "-")
CALENDAR_LEGEND = (
    "GF grandfather, F father, S son, Y yearly, k kept by another rule, "
    "P protected, - pruned, * more than one generation that day"
)


def plan_json(result: Plan, zone: tzinfo) -> dict[str, Any]:
    """{"keep": [{"time", "reasons", "labels", "id"}...], "prune": [{"time", "id"}...]}."""
    return {
        "keep": [
            {
                "time": format_timestamp(kept.generation.time, zone),
                "reasons": list(kept.reasons),
                "labels": list(kept.labels),
                "id": kept.generation.id,
            }
            for kept in result.keep
        ],
        "prune": [{"time": format_timestamp(gen.time, zone), "id": gen.id} for gen in result.prune],
    }


def describe_rules(rules: RetentionRules) -> str:
    """One line: the semantics and its non-zero rules, e.g. `gfs: sons 6, fathers 4`."""
    if rules.semantics == "gfs":
        pairs = [
            ("sons", rules.sons),
            ("fathers", rules.fathers),
            ("grandfathers", rules.grandfathers),
            ("yearly", rules.yearly),
        ]
        extra = f", fathers on {WEEKDAYS[rules.father_weekday].title()}"
    else:
        pairs = [
            ("keep-last", rules.keep_last),
            ("keep-hourly", rules.keep_hourly),
            ("keep-daily", rules.keep_daily),
            ("keep-weekly", rules.keep_weekly),
            ("keep-monthly", rules.keep_monthly),
            ("keep-yearly", rules.keep_yearly),
        ]
        extra = f", keep-within {rules.keep_within.text}" if rules.keep_within else ""
    counts = ", ".join(
        f"{name} {'all' if value == -1 else value}" for name, value in pairs if value
    )
    return f"{rules.semantics}: {counts}{extra}"


def plan_table(result: Plan, zone: tzinfo) -> Iterator[str]:
    """Rows newest first: time, KEEP/prune, labels, reasons."""
    rows: list[tuple[datetime, str, str, str]] = []
    rows += [
        (k.generation.time, "keep", ",".join(k.labels), ", ".join(k.reasons)) for k in result.keep
    ]
    rows += [(gen.time, "prune", "", "") for gen in result.prune]
    rows.sort(key=lambda row: row[0], reverse=True)
    yield f"  {'TIME':<28} {'ACTION':<6} {'LABELS':<22} REASONS"
    for stamp, action, labels, reasons in rows:
        local = stamp.astimezone(zone)
        shown = f"{local:%Y-%m-%d %H:%M:%S %a} {local:%Z}"
        yield f"  {shown:<28} {action:<6} {labels:<22} {reasons}".rstrip()


def cell_code(kept: Kept | None) -> str:
    """The calendar code of one generation: its highest tier kept, or k, P, - ."""
    if kept is None:
        return "-"
    if REASON_PROTECTED in kept.reasons:
        return "P"
    tiers = {_TIER_RULES.get(reason.split("[")[0], reason) for reason in kept.reasons}
    for label in (YEARLY, GRANDFATHER, FATHER, SON):
        if label in tiers:
            return _CODES[label]
    return "k"


def plan_calendar(result: Plan, zone: tzinfo, week_start: int = 0) -> Iterator[str]:
    """Weeks as rows, weekdays as columns, like the classic rotation table.

    Runs of weeks in which nothing is kept collapse into one line.
    """
    by_day: dict[date, list[str]] = defaultdict(list)
    for kept in result.keep:
        by_day[kept.generation.time.astimezone(zone).date()].append(cell_code(kept))
    for gen in result.prune:
        by_day[gen.time.astimezone(zone).date()].append(cell_code(None))
    if not by_day:
        return
    names = [WEEKDAYS[(week_start + i) % 7].title() for i in range(7)]
    yield ("  week of    " + "".join(f"{name:<5}" for name in names)).rstrip()
    first = _week_start(min(by_day), week_start)
    last = max(by_day)
    quiet: list[int] = []
    week = first
    while week <= last:
        cells = [_cell(by_day.get(week + timedelta(days=i), [])) for i in range(7)]
        if all(cell in ("", "-") for cell in cells):
            quiet.append(sum(len(by_day.get(week + timedelta(days=i), [])) for i in range(7)))
        else:
            yield from _quiet_line(quiet)
            quiet = []
            yield f"  {week.isoformat()} " + "".join(f"{cell:<5}" for cell in cells).rstrip()
        week += timedelta(days=7)
    yield from _quiet_line(quiet)


def _quiet_line(quiet: list[int]) -> Iterator[str]:
    if quiet:
        yield f"  ... {len(quiet)} week(s), {sum(quiet)} generation(s), none kept"


def _week_start(day: date, week_start: int) -> date:
    return day - timedelta(days=(day.weekday() - week_start) % 7)


def _cell(codes: list[str]) -> str:
    if not codes:
        return ""
    best = min(codes, key=_CODE_RANK.index)
    kept = sum(1 for code in codes if code != "-")
    return best + ("*" if kept > 1 else "")


def summary(result: Plan) -> str:
    return f"keep {len(result.keep)}, prune {len(result.prune)}"
