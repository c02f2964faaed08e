"""`gfs plan --simulate DAYS`: run a policy forward, one scheduled export after another."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from gfs_backup.core.errors import InputError, Problem
from gfs_backup.core.schedule import Schedule
from gfs_backup.retention import Generation, Plan, RetentionRules, plan

MAX_RUNS = 200_000


@dataclass(frozen=True)
class Simulation:
    """`plan.keep` is what exists at the end; `plan.prune` every generation pruned on the way."""

    plan: Plan
    runs: int
    start: datetime
    end: datetime
    most_held: int


def simulate(
    existing: list[Generation],
    rules: RetentionRules,
    schedule: Schedule,
    zone: tzinfo,
    start: datetime,
    days: int,
) -> Simulation:
    """Add a generation at every scheduled time in (start, start+days] and prune after each.

    Raises InputError when the schedule never fires or fires too often to simulate.
    """
    end = start + timedelta(days=days)
    held = list(existing)
    pruned: list[Generation] = []
    runs = 0
    most_held = len(held)
    when = schedule.next_after(start, zone)
    while when is not None and when <= end:
        runs += 1
        if runs > MAX_RUNS:
            raise InputError(
                Problem(
                    "--simulate",
                    f"schedule {schedule.text!r} fires more "
                    f"than {MAX_RUNS} times in {days} days: simulate fewer",
                )
            )
        held.append(Generation(f"run-{runs}", when))
        most_held = max(most_held, len(held))  # the new export exists before prune runs
        step = plan(held, rules, when, zone)
        pruned.extend(step.prune)
        held = [kept.generation for kept in step.keep]
        when = schedule.next_after(when, zone)
    final = plan(held, rules, end, zone)
    pruned.extend(final.prune)
    pruned.sort(key=lambda gen: gen.time, reverse=True)
    return Simulation(Plan(final.keep, pruned), runs, start, end, most_held)
