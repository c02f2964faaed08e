"""`gfs check`: lint the configuration and its policies, then the health of every job."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import click

from gfs_backup.actions.coverage import coverage
from gfs_backup.actions.members import pattern_job_warnings
from gfs_backup.actions.plan import select_jobs
from gfs_backup.actions.status import job_status
from gfs_backup.cli.inspect import coverage_json, coverage_lines
from gfs_backup.cli.options import config_option, json_option
from gfs_backup.cli.render import describe_rules
from gfs_backup.core.config import Job, load_config
from gfs_backup.core.errors import ExitCode
from gfs_backup.core.state import State
from gfs_backup.ops.settings import ops_warnings


@click.command("check")
@config_option
@click.option(
    "--lint-only",
    is_flag=True,
    help="Only validate the files; do not look at targets, generations, state.",
)
@json_option
def check_command(config_path: Path, lint_only: bool, as_json: bool) -> None:
    """Validate the configuration and its policies, then check each job's health.

    \b
    Every problem is reported at once, one line each, with the file and the dotted key
    path (e.g. `job[web01].policy.retention.sons`). Health warnings, for monitoring:
    targets that are not mounted or not NFS, newest generations older than the schedule
    allows or not verified, gfs snapshots left without an export, a domain left running
    on a gfs overlay by an interrupted run.
    Exit 0 all good, 3 invalid configuration, 7 valid but with warnings.
    """
    config = load_config(config_path)
    warnings: dict[str, list[str]] = {}
    general = [] if lint_only else ops_warnings(config)
    covered = None if lint_only else coverage(config)
    if not lint_only:
        now = datetime.now(timezone.utc)
        state = State.read_only(config.state_dir)
        try:
            for job in config.jobs:
                # A pattern job: the warnings of each domain's history, and of its target
                # and libvirt even before any domain has a history.
                found = pattern_job_warnings(config, job) if job.selects_domains else []
                for one in select_jobs(config, [job.name]):
                    found += job_status(config, one, state, now).warnings
                warnings[job.name] = list(dict.fromkeys(found))
        finally:
            if state is not None:
                state.close()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "config": config.source,
                    "warnings": general,
                    "jobs": [
                        {
                            "name": job.name,
                            "kind": job.kind,
                            "host": job.host,
                            "target": job.target,
                            "policy": job.policy.name,
                            "warnings": warnings.get(job.name, []),
                        }
                        for job in config.jobs
                    ],
                    **(coverage_json(covered) if covered is not None else {}),
                },
                indent=2,
            )
        )
    else:
        click.echo(
            f"{config.source}: valid, {len(config.jobs)} job(s), {len(config.targets)} target(s)"
        )
        for warning in general:
            click.echo(f"  warning: {warning}")
        for job in config.jobs:
            click.echo(
                f"  {job.name}: {job.kind} on {where(job)} -> {job.target}, policy "
                f"{job.policy.name} ({describe_rules(job.policy.rules)})"
            )
            for warning in warnings.get(job.name, []):
                click.echo(f"    warning: {warning}")
        for line in coverage_lines(covered) if covered is not None else []:
            click.echo(f"  {line}")
    uncovered = covered is not None and bool(covered.uncovered or covered.problems)
    if general or any(warnings.values()) or uncovered:
        raise SystemExit(int(ExitCode.WARNINGS))


def where(job: Job) -> str:
    """Where a job runs: its host, or the cluster whose hosts it follows its domain across."""
    cluster = job.options.get("cluster")
    return f"cluster {cluster}" if cluster else job.host
