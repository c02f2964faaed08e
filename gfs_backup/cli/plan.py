"""`gfs plan`: what retention keeps and prunes, without touching anything."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any, cast

import click

from gfs_backup.actions.plan import (
    plan_job,
    read_timestamps,
    rules_from_options,
    select_jobs,
)
from gfs_backup.actions.simulate import simulate
from gfs_backup.cli.complete import complete_jobs
from gfs_backup.cli.options import config_option, json_option
from gfs_backup.cli.render import (
    CALENDAR_LEGEND,
    describe_rules,
    plan_calendar,
    plan_json,
    plan_table,
    summary,
)
from gfs_backup.core.config import load_config
from gfs_backup.core.errors import InputError, Problem
from gfs_backup.core.policy import (
    GFS_COUNT_KEYS,
    KEEP_COUNT_KEYS,
    Policy,
    find_policy,
    load_policy_file,
)
from gfs_backup.core.schedule import parse_schedule
from gfs_backup.core.timeutil import format_timestamp, parse_timestamp, resolve_zone
from gfs_backup.retention import SEMANTICS, Generation, Plan, RetentionRules, Semantics

DEFAULT_POLICY = "classic-gfs"
COUNT_OPTIONS = (*KEEP_COUNT_KEYS, *GFS_COUNT_KEYS)

PLAN_HELP = """Preview retention: what is kept (with labels and reasons) and what is pruned.

\b
Two modes:
  gfs plan [JOB...]            the generations on each configured job's target
  gfs plan --timestamps FILE   a prune simulator for any list of timestamps

FILE holds one ISO-8601 timestamp per line (naive ones are wall-clock time in --tz; `-`
reads stdin). The rules come from --policy (default: classic-gfs) unless rule options are
given. --semantics picks whose meaning the keep-* rules have: pbs (Proxmox VE/PBS prune),
borg (borg 1.x prune) or restic (restic forget); gfs is the classic tiered rotation with
--sons/--fathers/--grandfathers/--yearly. Counts: 0 = off, -1 = unlimited.

\b
--keep-within takes the selected tool's syntax:
  borg    <N><unit>, unit H d w m y (m = 31 days, y = 365 days), measured from --at
  restic  e.g. 1y2m3d3h (calendar months), measured from the newest generation

--simulate DAYS runs the policy forward from --at: a generation at every time of the
policy's schedule (or --schedule), pruned after each run, and shows what exists at the end.

\b
Examples:
  gfs plan --timestamps stamps.txt --semantics borg --keep-daily 7 --keep-within 2d
  gfs plan --policy proxmox-default --timestamps stamps.txt --json
  gfs plan --policy classic-gfs --simulate 365
"""


def _count_options(func: Any) -> Any:
    for name in reversed(COUNT_OPTIONS):
        func = click.option(
            f"--{name}",
            type=int,
            default=None,
            metavar="N",
            help=f"Rule {name} (N newest periods; -1 = all).",
        )(func)
    return func


@click.command("plan", help=PLAN_HELP)
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
@config_option
@click.option(
    "--timestamps",
    "timestamps_file",
    metavar="FILE",
    help="Plan these timestamps (one ISO-8601 per line) instead of configured jobs.",
)
@click.option(
    "--policy",
    "policy_name",
    metavar="NAME|FILE",
    help=f"Policy for --timestamps/--simulate (default: {DEFAULT_POLICY}).",
)
@click.option(
    "--semantics",
    type=click.Choice(SEMANTICS),
    default=None,
    help="Meaning of the rules (default: the policy's).",
)
@_count_options
@click.option(
    "--keep-within",
    "keep_within",
    metavar="DURATION",
    default=None,
    help="Keep everything within DURATION (borg and restic syntax).",
)
@click.option(
    "--at",
    "at_text",
    metavar="ISO-8601",
    default=None,
    help="Plan as if it were this time (default: now).",
)
@click.option(
    "--tz",
    "tz_name",
    metavar="ZONE",
    default=None,
    help="IANA time zone for calendar periods (default: the policy's; 'local').",
)
@click.option(
    "--simulate",
    "simulate_days",
    type=click.IntRange(1, 36600),
    default=None,
    metavar="DAYS",
    help="Run the policy forward DAYS days and show the result.",
)
@click.option(
    "--schedule",
    "schedule_text",
    metavar="CALENDAR",
    default=None,
    help="Export schedule for --simulate, e.g. 'Mon..Sat 01:00' (default: policy's).",
)
@click.option(
    "--calendar/--no-calendar",
    default=True,
    show_default=True,
    help="Show the calendar view below the table.",
)
@json_option
def plan_command(
    jobs: tuple[str, ...],
    config_path: Path,
    timestamps_file: str | None,
    policy_name: str | None,
    semantics: str | None,
    keep_within: str | None,
    at_text: str | None,
    tz_name: str | None,
    simulate_days: int | None,
    schedule_text: str | None,
    calendar: bool,
    as_json: bool,
    **counts: int | None,
) -> None:
    rule_options: dict[str, Any] = {
        key.replace("_", "-"): value for key, value in counts.items() if value is not None
    }
    if keep_within is not None:
        rule_options["keep-within"] = keep_within
    simulator = timestamps_file is not None or simulate_days is not None
    if not simulator:
        misplaced = [f"--{key}" for key in rule_options]
        misplaced += [
            name
            for name, value in (
                ("--policy", policy_name),
                ("--semantics", semantics),
                ("--schedule", schedule_text),
            )
            if value
        ]
        if misplaced:
            raise click.UsageError(
                f"{', '.join(misplaced)} need --timestamps or --simulate; "
                "configured jobs use their own policies"
            )
        _plan_configured(jobs, config_path, at_text, tz_name, calendar, as_json)
        return
    if jobs:
        raise click.UsageError("job names and --timestamps/--simulate do not go together")
    policy = load_policy_file(find_policy(policy_name or DEFAULT_POLICY))
    rules = rules_from_options(policy, cast(Semantics | None, semantics), rule_options)
    zone = _zone(tz_name or policy.timezone)
    now = _now(at_text, zone)
    generations = _read_file(timestamps_file, zone) if timestamps_file else []
    source = f"policy {policy.name}" if not rule_options else "options"
    if simulate_days is None:
        from gfs_backup.retention import plan as plan_retention

        result = plan_retention(generations, rules, now, zone)
        header = [
            f"Rules ({source}) {describe_rules(rules)}",
            f"Time zone {_zone_name(tz_name or policy.timezone, zone)}, "
            f"now {format_timestamp(now, zone)}",
        ]
    else:
        result, header = _simulate(
            policy, rules, schedule_text, zone, now, simulate_days, generations, source
        )
    _emit(result, rules, zone, header, calendar, as_json)


def _simulate(
    policy: Policy,
    rules: RetentionRules,
    schedule_text: str | None,
    zone: tzinfo,
    now: datetime,
    days: int,
    generations: list[Generation],
    source: str,
) -> tuple[Plan, list[str]]:
    try:
        schedule = parse_schedule(schedule_text) if schedule_text else policy.schedule
    except ValueError as exc:
        raise InputError(Problem("--schedule", str(exc))) from None
    run = simulate(generations, rules, schedule, zone, now, days)
    header = [
        f"Rules ({source}) {describe_rules(rules)}",
        f"Simulated {days} day(s) of schedule {schedule.text!r} from "
        f"{format_timestamp(run.start, zone)} to {format_timestamp(run.end, zone)}: "
        f"{run.runs} run(s), at most {run.most_held} generation(s) held at once",
        "What exists at the end (prune = pruned along the way):",
    ]
    return run.plan, header


def _emit(
    result: Plan,
    rules: RetentionRules,
    zone: tzinfo,
    header: list[str],
    calendar: bool,
    as_json: bool,
) -> None:
    if as_json:
        click.echo(json.dumps(plan_json(result, zone)))
        return
    lines: list[str] = [*header, *plan_table(result, zone), summary(result)]
    if calendar:
        week_start = rules.father_weekday if rules.semantics == "gfs" else 0
        lines += ["", f"Calendar ({CALENDAR_LEGEND}):", *plan_calendar(result, zone, week_start)]
    click.echo("\n".join(lines))


def _plan_configured(
    names: tuple[str, ...],
    config_path: Path,
    at_text: str | None,
    tz_name: str | None,
    calendar: bool,
    as_json: bool,
) -> None:
    config = load_config(config_path)
    selected = select_jobs(config, names)
    now = _now(at_text, _zone(tz_name or "UTC"))
    plans = [plan_job(job, config, now) for job in selected]
    for job_plan in plans:
        for problem in job_plan.problems:
            click.echo(f"gfs: warning: {problem}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "jobs": [
                        {
                            "job": p.job.name,
                            "policy": p.job.policy.name,
                            "target": p.job.target,
                            "path": str(p.job_dir),
                            **plan_json(p.plan, _zone_for(p.job.policy, tz_name)),
                        }
                        for p in plans
                    ]
                }
            )
        )
        return
    if not plans:
        click.echo(f"{config.source}: no jobs configured")
    for job_plan in plans:
        click.echo(
            "\n".join(
                _job_lines(
                    job_plan.job.name,
                    job_plan.job_dir,
                    job_plan.plan,
                    job_plan.job.policy,
                    tz_name,
                    calendar,
                )
            )
        )


def _job_lines(
    name: str, job_dir: Path, result: Plan, policy: Policy, tz_name: str | None, calendar: bool
) -> Iterator[str]:
    zone = _zone_for(policy, tz_name)
    yield f"Job {name}: policy {policy.name} ({describe_rules(policy.rules)}), {job_dir}"
    if not result.keep and not result.prune:
        yield "  no generations on the target yet: nothing to keep or prune"
        return
    yield from plan_table(result, zone)
    yield summary(result)
    if calendar:
        week_start = policy.rules.father_weekday if policy.rules.semantics == "gfs" else 0
        yield from plan_calendar(result, zone, week_start)


def _zone_for(policy: Policy, tz_name: str | None) -> tzinfo:
    return _zone(tz_name) if tz_name else policy.zone


def _zone(name: str) -> tzinfo:
    try:
        return resolve_zone(name)
    except ValueError as exc:
        raise InputError(Problem("--tz", str(exc))) from None


def _zone_name(name: str, zone: tzinfo) -> str:
    key = getattr(zone, "key", None)
    return f"{name} ({key})" if key and key != name else name


def _now(at_text: str | None, zone: tzinfo) -> datetime:
    if at_text is None:
        return datetime.now(timezone.utc)
    try:
        return parse_timestamp(at_text, zone)
    except ValueError:
        raise InputError(
            Problem(
                "--at",
                f"cannot parse {at_text!r} as an ISO-8601 timestamp "
                "(e.g. 2026-11-23T08:00:00+01:00)",
            )
        ) from None


def _read_file(name: str, zone: tzinfo) -> list[Generation]:
    if name == "-":
        return read_timestamps(sys.stdin, "<stdin>", zone)
    path = Path(name)
    try:
        with path.open(encoding="utf-8") as handle:
            return read_timestamps(handle, name, zone)
    except UnicodeDecodeError:
        raise InputError(Problem(name, "not a text file of timestamps (not UTF-8)")) from None
    except OSError as exc:
        raise InputError(Problem(name, f"cannot read timestamps: {exc.strerror}")) from None
