"""`gfs plan`: preview retention for configured jobs or for a list of timestamps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from gfs_backup.actions.members import stored_members
from gfs_backup.actions.targets import job_location
from gfs_backup.core.config import Config, Job
from gfs_backup.core.errors import InputError, Problem
from gfs_backup.core.policy import Policy, build_rules
from gfs_backup.core.timeutil import parse_timestamp
from gfs_backup.core.validate import Collector
from gfs_backup.retention import Generation, Plan, RetentionRules, Semantics, plan
from gfs_backup.target.catalog import list_generations

MAX_REPORTED_LINES = 10


@dataclass(frozen=True)
class JobPlan:
    job: Job
    job_dir: Path
    plan: Plan
    problems: list[Problem] = field(default_factory=list)


def read_timestamps(lines: Iterable[str], source: str, zone: tzinfo) -> list[Generation]:
    """Generations from one ISO-8601 timestamp per line (blank lines and # comments skipped).

    A naive timestamp is wall-clock time in `zone`. The id of each is its line number.
    Raises InputError naming the file and line of every unparseable line, or when empty.
    """
    generations: list[Generation] = []
    bad: list[Problem] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            generations.append(Generation(str(number), parse_timestamp(text, zone)))
        except ValueError:
            bad.append(
                Problem(
                    f"{source}:{number}",
                    f"cannot parse {text[:60]!r} as an "
                    "ISO-8601 timestamp (e.g. 2026-11-23T01:00:00+01:00)",
                )
            )
    if bad:
        if len(bad) > MAX_REPORTED_LINES:
            more = len(bad) - MAX_REPORTED_LINES
            bad = [*bad[:MAX_REPORTED_LINES], Problem(source, f"... and {more} more bad lines")]
        raise InputError(bad)
    if not generations:
        raise InputError(
            Problem(source, "no timestamps in the file: put one ISO-8601 timestamp per line")
        )
    return generations


def rules_from_options(
    policy: Policy, semantics: Semantics | None, options: Mapping[str, Any]
) -> RetentionRules:
    """The rules a simulator run uses: the rule options if any are given, else the policy's.

    `options` maps rule keys (keep-daily, sons, ...) to the values given on the command line.
    Raises InputError when the options do not make a valid policy.
    """
    if not options:
        if semantics is not None and semantics != policy.rules.semantics:
            raise InputError(
                Problem(
                    "--semantics",
                    f"policy {policy.name!r} uses {policy.rules.semantics} "
                    f"semantics; give the rules for {semantics} (e.g. --keep-daily 7)",
                )
            )
        return policy.rules
    collector = Collector("options", options=True)
    rules = build_rules(semantics or policy.rules.semantics, options, collector, "")
    collector.raise_if_any()
    return rules


def plan_job(job: Job, config: Config, now: datetime) -> JobPlan:
    """Plan one configured job from the generations on its target (none yet: empty plan)."""
    job_dir, fs = job_location(config, job)
    listing = list_generations(job_dir, fs)
    result = plan(listing.generations, job.policy.rules, now, job.policy.zone)
    return JobPlan(job, job_dir, result, listing.problems)


def select_jobs(config: Config, names: Iterable[str], members: bool = True) -> list[Job]:
    """The named jobs (all when none named). A job with `domains` patterns stands for its
    domains' histories on the target (`members`, see gfs_backup/actions/members.py), and
    `JOB/DOMAIN` (a name or UUID) names one of them. Raises InputError for unknown names."""
    wanted = list(names)
    by_name = {job.name: job for job in config.jobs}
    chosen: list[Job] = []
    problems: list[Problem] = []
    for name in wanted or list(by_name):
        job = by_name.get(name)
        if job is not None:
            chosen += stored_members(config, job) if members and job.selects_domains else [job]
            continue
        parent, _, domain = name.replace("@", "/", 1).partition("/")
        found = [
            one
            for one in (stored_members(config, by_name[parent]) if parent in by_name else [])
            if domain in (one.options["domain"], one.options["uuid"])
        ]
        if len(found) == 1:
            chosen += found
        elif found:
            uuids = ", ".join(one.options["uuid"] for one in found)
            problems.append(
                Problem(
                    config.source,
                    f"{name}: several domains had that name ({uuids}): use {parent}/UUID",
                )
            )
        elif parent in by_name and by_name[parent].selects_domains:
            problems.append(
                Problem(config.source, f"job {parent} has no generations of a domain {domain!r}")
            )
        else:
            known = ", ".join(by_name) or "none"
            problems.append(Problem(config.source, f"no job named {name!r} (jobs: {known})"))
    if problems:
        raise InputError(problems)
    return chosen


def select_one(config: Config, name: str) -> Job:
    """The one job (or domain of a pattern job: `JOB/DOMAIN`) that `name` names."""
    found = select_jobs(config, [name])
    if len(found) != 1:
        domains = ", ".join(one.title for one in found) or "none backed up yet"
        raise InputError(
            [Problem(config.source, f"job {name} backs up several domains: name one ({domains})")]
        )
    return found[0]
