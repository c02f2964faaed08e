"""`gfs list` and `gfs status`: what exists and how the jobs are doing (read-only)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from gfs_backup.actions.coverage import Coverage, coverage
from gfs_backup.actions.freshness import UNKNOWN, check_line, judge
from gfs_backup.actions.monitoring import write_metrics
from gfs_backup.actions.plan import select_jobs
from gfs_backup.actions.status import (
    capture_summary,
    generation_size,
    job_status,
    skipped_count,
)
from gfs_backup.actions.verify import last_verified_ok
from gfs_backup.backends.vm_capture import capture_of
from gfs_backup.cli.complete import complete_jobs
from gfs_backup.cli.options import config_option, json_option
from gfs_backup.core.config import Job, load_config
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.core.state import State
from gfs_backup.ops.settings import ops_of
from gfs_backup.target.catalog import Stored

HOSTS_SHOWN = 6  # generations whose host `gfs status` names (all in --json)


def _stored_json(stored: Stored) -> dict[str, Any]:
    manifest = stored.manifest
    return {
        "id": stored.id,
        "created_at": manifest.created_at.isoformat(),
        "host": manifest.host,  # where the source was read (a domain may move between hosts)
        "labels": list(manifest.labels),
        "protected": manifest.protected,
        "point_in_time": manifest.point_in_time,
        "size": generation_size(stored),
        "verified": manifest.verify[-1] if manifest.verify else None,
        "drilled": manifest.drills[-1] if manifest.drills else None,
        "skipped": skipped_count(stored),
        "capture": {
            key: value
            for key, value in capture_of(stored).items()
            if key in ("mode", "base", "reason", "bytes_read", "bytes_written", "new_bytes")
        }
        or None,
        "warnings": list(manifest.warnings),
        "path": str(stored.path),
    }


@click.command("list")
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
@config_option
@json_option
def list_command(jobs: tuple[str, ...], config_path: Path, as_json: bool) -> None:
    """List the generations of each job, read from the target alone (its manifests).

    Works on a fresh machine that only mounts the share and has the config.
    """
    config = load_config(config_path)
    now = datetime.now(timezone.utc)
    statuses = [job_status(config, job, None, now) for job in select_jobs(config, jobs)]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "jobs": [
                        {
                            "job": s.job.title,
                            **_domain_json(s.job),
                            "path": str(s.job_dir),
                            "generations": [_stored_json(g) for g in s.listing.stored],
                        }
                        for s in statuses
                    ]
                },
                indent=2,
            )
        )
        return
    for status in statuses:
        click.echo(
            f"{status.job.title} ({status.job_dir}): {len(status.listing.stored)} generation(s)"
        )
        zone = status.job.policy.zone
        for stored in reversed(status.listing.stored):
            manifest = stored.manifest
            flags = [",".join(manifest.labels) or "-"]
            flags.append("verified" if last_verified_ok(stored) else "unverified")
            if manifest.drills:
                passed = manifest.drills[-1].get("outcome") == "pass"
                flags.append("drill passed" if passed else "drill FAILED")
            if manifest.protected:
                flags.append("protected")
            if not manifest.point_in_time:
                flags.append("not point-in-time")
            if manifest.host != "local":
                flags.append(f"from host {manifest.host}")
            if manifest.source.get("transient"):
                flags.append("transient domain")
            if manifest.source.get("renamed_from"):
                flags.append(f"renamed from {manifest.source['renamed_from']}")
            if skipped := skipped_count(stored):
                flags.append(f"{skipped} skipped")
            if capture := capture_summary(stored):
                flags.append(capture)
            if manifest.warnings:
                flags.append(f"{len(manifest.warnings)} warning(s)")
            created = manifest.created_at.astimezone(zone)
            click.echo(
                f"  {stored.id:<20} {created:%Y-%m-%d %H:%M %Z}  "
                f"{generation_size(stored):>14,d} B  {'  '.join(flags)}"
            )
        for problem in status.listing.problems:
            click.echo(f"  ! {problem}")


def coverage_json(found: Coverage) -> dict[str, Any]:
    return {
        "uncovered": [
            {"kind": item.kind, "name": item.name, "where": item.where} for item in found.uncovered
        ],
        "left_out": [{"domain": name, "why": why} for name, why in found.left_out],
        "coverage_problems": found.problems,
    }


def coverage_lines(found: Coverage) -> list[str]:
    """What no job backs up, one line each, then what was left out on purpose."""
    lines = [f"uncovered: {item.line()}" for item in found.uncovered]
    lines += [f"left out: domain {name}: {why}" for name, why in found.left_out]
    lines += [f"warning: {problem}" for problem in found.problems]
    return lines


def _domain_json(job: Job) -> dict[str, str]:
    """The domain and UUID of a `domains` job's history (nothing for other jobs)."""
    if job.parent is None:
        return {}
    return {"domain": str(job.options["domain"]), "uuid": str(job.options["uuid"])}


@click.command("status")
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
@config_option
@json_option
@click.option(
    "--check",
    is_flag=True,
    help="One line for Nagios/Icinga with perfdata; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
)
def status_command(jobs: tuple[str, ...], config_path: Path, as_json: bool, check: bool) -> None:
    """Last result of each job: last success, its age and size, next due, the last
    restore drill (`gfs drill`), warnings.

    \b
    --check judges each job as a monitoring plugin (on what the target holds):
      WARNING   newest verified generation older than max_age, last run failed,
                verify or drill older than max_verify_age / max_drill_age
      CRITICAL  older than twice max_age, no verified generation, last drill failed
      UNKNOWN   the config, state or a target cannot be read
    max_age defaults to 1.5 x the longest gap of the policy's schedule (daily: 36h).
    Its exit codes follow the plugin convention, not gfs's own (docs/operations.md).
    """
    if check:
        _check_status(jobs, config_path)
        return
    config = load_config(config_path)
    now = datetime.now(timezone.utc)
    state = State.read_only(config.state_dir)
    try:
        statuses = [job_status(config, job, state, now) for job in select_jobs(config, jobs)]
    finally:
        if state is not None:
            state.close()
    rows: list[dict[str, Any]] = []
    for status in statuses:
        success = status.last_success
        drilled = status.last_drill
        rows.append(
            {
                "job": status.job.title,
                **_domain_json(status.job),
                "last_run": status.last_run.status if status.last_run else None,
                "last_message": status.last_run.message if status.last_run else None,
                "last_success": success.started_at.isoformat() if success else None,
                "age_hours": round((now - success.started_at).total_seconds() / 3600, 1)
                if success
                else None,
                "bytes": success.bytes if success else None,
                "generations": len(status.listing.stored),
                "next_due": status.next_due.isoformat() if status.next_due else None,
                "last_drill": {
                    "time": drilled.started_at.isoformat(),
                    "generation": drilled.generation,
                    "outcome": "pass" if drilled.status == "drilled" else "fail",
                    "seconds": drilled.seconds,
                    "message": drilled.message,
                }
                if drilled
                else None,
                "warnings": status.warnings,
                # where each generation's source was read (a cluster's domain moves)
                "generation_hosts": [
                    {"id": g.id, "host": g.manifest.host} for g in status.listing.stored
                ],
            }
        )
    found = coverage(config) if not jobs else None
    if as_json:
        extra = coverage_json(found) if found is not None else {}
        click.echo(json.dumps({"jobs": rows, **extra}, indent=2))
        return
    for row in rows:
        click.echo(
            f"{row['job']}: last run {row['last_run'] or 'never'}, last success "
            f"{row['last_success'] or 'never'}"
            + (f" ({row['age_hours']} h ago, {row['bytes']:,d} B)" if row["last_success"] else "")
            + f", {row['generations']} generation(s), next due {row['next_due']}"
        )
        drill = row["last_drill"]
        if drill is not None:
            verdict = "passed" if drill["outcome"] == "pass" else "FAILED"
            click.echo(
                f"  last drill: {verdict} {drill['time']} (generation {drill['generation']}): "
                f"{drill['message']}"
            )
        hosts = row["generation_hosts"]
        if any(g["host"] != "local" for g in hosts):
            newest = [f"{g['id']} {g['host']}" for g in reversed(hosts)][:HOSTS_SHOWN]
            more = f", {len(hosts) - HOSTS_SHOWN} more" if len(hosts) > HOSTS_SHOWN else ""
            click.echo(f"  host of each generation, newest first: {', '.join(newest)}{more}")
        for warning in row["warnings"]:
            click.echo(f"  warning: {warning}")
    if found is not None:
        for line in coverage_lines(found):
            click.echo(line)


def _check_status(jobs: tuple[str, ...], config_path: Path) -> None:
    """`gfs status --check`: any error is UNKNOWN (exit 3) with one line, never a traceback."""
    now = datetime.now(timezone.utc)
    try:
        config = load_config(config_path)
        selected = select_jobs(config, jobs)
        state = State.read_only(config.state_dir)
        try:
            judged = [  # judged on listings and runs: the health checks are gfs check's
                judge(job_status(config, job, state, now, health=False), now) for job in selected
            ]
        finally:
            if state is not None:
                state.close()
        # What no job backs up (all jobs asked for: a named job says nothing about it).
        uncovered = None if jobs else [item.name for item in coverage(config).uncovered]
    except GfsError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        click.echo(f"GFS UNKNOWN - {first}")
        raise SystemExit(UNKNOWN) from None
    code, line = check_line(judged, now, uncovered=uncovered)
    click.echo(line)
    raise SystemExit(code)


@click.command("metrics")
@config_option
@click.option(
    "--textfile",
    "textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here instead of [metrics] textfile.",
)
def metrics_command(config_path: Path, textfile: Path | None) -> None:
    """Write every job's Prometheus metrics to node_exporter's textfile collector now
    (`gfs run` does it after every run). The file is replaced atomically.

    \b
    Default path: /var/lib/prometheus/node-exporter/gfs.prom ([metrics] textfile).
    Metric names and meanings: docs/operations.md. Exit 0 written, 5 not written.
    """
    config = load_config(config_path)
    path = textfile or ops_of(config).textfile
    if path is None:
        raise click.ClickException('metrics are off ([metrics] textfile = "off"): use --textfile')
    written = write_metrics(config, datetime.now(timezone.utc), path=path)
    if written is None:
        click.echo(f"gfs: metrics not written to {path} (see the message above)", err=True)
        raise SystemExit(int(ExitCode.FAILED))
    click.echo(f"metrics written to {written}")
