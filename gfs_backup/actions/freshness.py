"""Is every job's backup fresh? `gfs status --check`: one line for Nagios/Icinga.

A job is judged on what its target holds (the manifests), not on gfs's own run history, so
a timer that never fired, a run that hung or a target that lost generations all show:

- the newest verified generation is older than `max_age`: WARNING; older than twice that,
  or no verified generation at all: CRITICAL;
- the newest passing verify of any generation is older than `max_verify_age`: WARNING;
- the newest drill failed: CRITICAL; the newest passing drill is older than
  `max_drill_age`: WARNING;
- the job's last run failed, the newest generation is not verified, a generation failed
  verification or carries a dirty-tracking alarm: WARNING;
- the target cannot be read: UNKNOWN.

Defaults: `max_age` is 1.5 times the longest gap between two firings of the policy's
schedule (a daily job: 36 h, so one missed night warns before the next night's run);
`max_verify_age` and `max_drill_age` likewise from the policy's `[verify] schedule` and
`[drill] schedule`, not judged when those are not set. Each can be set per job ("off": not
judged).

The plugin's exit codes are the monitoring-plugin convention (0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN), distinct from gfs's own exit codes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

from gfs_backup.actions.status import JobStatus
from gfs_backup.backends.vm_capture import capture_of
from gfs_backup.core.config import Job
from gfs_backup.core.schedule import Schedule
from gfs_backup.target.catalog import Stored

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
DEFAULT_FACTOR = 1.5  # of the schedule's longest gap
_GAPS = 40  # firings looked at to find the longest gap (covers weekly and monthly patterns)


@dataclass(frozen=True)
class Limits:
    """Seconds; None: not judged."""

    max_age: float | None
    max_verify_age: float | None
    max_drill_age: float | None


@dataclass
class Freshness:
    job: str
    state: int = OK
    reasons: list[str] = field(default_factory=list)
    newest: datetime | None = None  # creation of the newest verified generation
    last_verify: datetime | None = None  # the newest passing verify of any generation
    last_drill: datetime | None = None  # the newest passing drill
    drill_failed: bool = False  # the newest drill failed
    limits: Limits = Limits(None, None, None)

    def raise_to(self, state: int, reason: str) -> None:
        self.state = worst(self.state, state)
        self.reasons.append(reason)


_RANK = {OK: 0, WARNING: 1, UNKNOWN: 2, CRITICAL: 3}  # what a summary of several shows


def worst(*states: int) -> int:
    """The state that outranks the others: CRITICAL, then UNKNOWN (cannot judge), then
    WARNING, then OK."""
    return max(states, key=_RANK.__getitem__, default=OK)


def longest_gap(schedule: Schedule, zone: tzinfo, now: datetime) -> float | None:
    """The longest time between two consecutive firings after `now`, in seconds; None
    when the schedule fires less than twice."""
    times: list[datetime] = []
    after = now
    for _ in range(_GAPS):
        found = schedule.next_after(after, zone)
        if found is None:
            break
        times.append(found)
        after = found
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
    return max(gaps) if gaps else None


def limits_of(job: Job, now: datetime) -> Limits:
    """The job's own limits (options max_age, ... in seconds, 0 = off), else the defaults
    from its policy's schedules."""
    policy = job.policy

    def pick(key: str, schedule: Schedule | None) -> float | None:
        if key in job.options:
            value = float(job.options[key])
            return value or None
        if schedule is None:
            return None
        gap = longest_gap(schedule, policy.zone, now)
        return gap * DEFAULT_FACTOR if gap else None

    return Limits(
        pick("max_age", policy.schedule),
        pick("max_verify_age", policy.verify_schedule),
        pick("max_drill_age", policy.drill_schedule),
    )


def _stamp(record: dict[str, object]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        return None


def _verified(stored: Stored) -> bool:
    verify = stored.manifest.verify
    return bool(verify) and verify[-1].get("result") == "ok"


def judge(status: JobStatus, now: datetime) -> Freshness:
    """The freshness of one job from its status (listing, runs)."""
    job = status.job
    found = Freshness(job.title, limits=limits_of(job, now))
    limits = found.limits
    stored = status.listing.stored
    for problem in status.listing.problems:
        found.raise_to(UNKNOWN, f"target unreadable: {problem}")
    verified = [item for item in stored if _verified(item)]
    if verified:
        found.newest = verified[-1].manifest.created_at
    verifies = [
        when
        for item in stored
        for record in item.manifest.verify
        if record.get("result") == "ok" and (when := _stamp(record)) is not None
    ]
    found.last_verify = max(verifies, default=None)
    drills = sorted(
        (when, record.get("outcome") == "pass")
        for item in stored
        for record in item.manifest.drills
        if (when := _stamp(record)) is not None
    )
    found.last_drill = max((when for when, passed in drills if passed), default=None)
    found.drill_failed = bool(drills) and not drills[-1][1]

    if found.newest is None:
        if not status.listing.problems:
            found.raise_to(CRITICAL, "no verified generation on the target")
    elif limits.max_age is not None:
        age = (now - found.newest).total_seconds()
        if age > 2 * limits.max_age:
            found.raise_to(
                CRITICAL, f"newest backup is {human(age)} old (max_age {human(limits.max_age)})"
            )
        elif age > limits.max_age:
            found.raise_to(
                WARNING, f"newest backup is {human(age)} old (max_age {human(limits.max_age)})"
            )
    if stored:
        _judge_age(found, "verify", found.last_verify, limits.max_verify_age, now)
    if found.drill_failed:
        found.raise_to(CRITICAL, "the last restore drill failed")
    elif stored:
        _judge_age(found, "drill", found.last_drill, limits.max_drill_age, now)
    if status.last_run is not None and status.last_run.status == "failed":
        found.raise_to(WARNING, f"last run failed: {status.last_run.message}")
    if stored and not _verified(stored[-1]):
        found.raise_to(WARNING, f"newest generation {stored[-1].id} is not verified")
    damaged = [item.id for item in stored if item.manifest.verify and not _verified(item)]
    if damaged:
        found.raise_to(WARNING, f"generation(s) {', '.join(damaged)} failed verification")
    if any(capture_of(item).get("alarm") for item in stored):
        found.raise_to(WARNING, "a dirty-tracking alarm (see gfs status)")
    return found


def _judge_age(
    found: Freshness, what: str, last: datetime | None, limit: float | None, now: datetime
) -> None:
    """WARNING when the newest passing `what` (verify, drill) is older than `limit`."""
    if limit is None:
        return
    if last is None:
        found.raise_to(WARNING, f"no passing {what} yet (max_{what}_age {human(limit)})")
        return
    age = (now - last).total_seconds()
    if age > limit:
        found.raise_to(
            WARNING, f"last passing {what} {human(age)} ago (max_{what}_age {human(limit)})"
        )


def human(seconds: float) -> str:
    """`3d 2h`, `5h 10m`, `12m`, `40s`."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def _label(job: str, what: str) -> str:
    # Perfdata labels: quoted when they hold anything but letters, digits and _ (job names
    # may hold '.' and '-'); a quote inside would be doubled, but job names have none.
    label = f"{job}_{what}"
    return label if label.replace("_", "").isalnum() else f"'{label}'"


def perfdata(found: Freshness, now: datetime) -> list[str]:
    """`label=value[s];warn;crit;0` items (monitoring-plugin perfdata)."""
    items = []
    limits = found.limits
    if found.newest is not None:
        age = int((now - found.newest).total_seconds())
        warn = f"{int(limits.max_age)}" if limits.max_age else ""
        crit = f"{int(2 * limits.max_age)}" if limits.max_age else ""
        items.append(f"{_label(found.job, 'age')}={age}s;{warn};{crit};0")
    if found.last_verify is not None:
        age = int((now - found.last_verify).total_seconds())
        warn = f"{int(limits.max_verify_age)}" if limits.max_verify_age else ""
        items.append(f"{_label(found.job, 'verify_age')}={age}s;{warn};;0")
    if found.last_drill is not None:
        age = int((now - found.last_drill).total_seconds())
        warn = f"{int(limits.max_drill_age)}" if limits.max_drill_age else ""
        items.append(f"{_label(found.job, 'drill_age')}={age}s;{warn};;0")
    return items


def check_line(
    results: list[Freshness],
    now: datetime,
    problems: Sequence[str] = (),
    uncovered: Sequence[str] | None = None,
) -> tuple[int, str]:
    """The plugin's exit code and its one output line: `GFS STATE - summary | perfdata`.
    `problems`: what made judging impossible (the state database): UNKNOWN unless worse.
    `uncovered`: what on the host no job backs up (a WARNING; None: not looked at)."""
    state = worst(
        *(found.state for found in results),
        UNKNOWN if problems else OK,
        WARNING if uncovered else OK,
    )
    bad = [found for found in results if found.state != OK]
    counts = ", ".join(
        f"{sum(1 for found in results if found.state == code)} {STATE_NAMES[code].lower()}"
        for code in (CRITICAL, WARNING, UNKNOWN)
        if any(found.state == code for found in results)
    )
    if uncovered:
        shown = ", ".join(uncovered[:5]) + (", ..." if len(uncovered) > 5 else "")
        problems = [*problems, f"{len(uncovered)} backed up by no job ({shown})"]
    if bad or problems:
        details = "; ".join(
            [*problems, *(f"{found.job}: {', '.join(found.reasons)}" for found in bad)]
        )
        summary = f"{counts + ' of ' if counts else ''}{len(results)} job(s): {details}"
    else:
        summary = f"{len(results)} job(s) fresh"
    perf = " ".join(item for found in results for item in perfdata(found, now))
    if uncovered is not None:
        perf = f"{perf} uncovered={len(uncovered)};1;;0".strip()
    line = f"GFS {STATE_NAMES[state]} - {summary}".replace("|", "/").replace("\n", " ")
    return state, f"{line} | {perf}" if perf else line
