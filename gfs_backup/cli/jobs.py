"""`gfs run`, `gfs export`, `gfs snapshot`, `gfs prune`: the commands that change things."""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType

import click

from gfs_backup.actions.monitoring import RunWatch, unit_failed
from gfs_backup.actions.plan import select_jobs
from gfs_backup.actions.run import JobOutcome, RunOptions, exit_code, now_utc, run_jobs
from gfs_backup.actions.steps import prune_jobs, snapshot_jobs
from gfs_backup.backends import backend_for
from gfs_backup.cli.complete import complete_jobs
from gfs_backup.cli.options import config_option, json_option
from gfs_backup.cli.progress import allocated_bytes, progress_for
from gfs_backup.core.config import load_config
from gfs_backup.core.errors import ExitCode

dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Show what would be done; change nothing."
)
wait_option = click.option(
    "--wait",
    is_flag=True,
    help="Wait for a job's lock held by another run (default: skip it and exit 6).",
)


class Terminated(Exception):
    """SIGTERM (systemd stop): unwind so partial exports are removed."""


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated("terminated by SIGTERM")


def _report(outcomes: list[JobOutcome], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"jobs": [asdict(outcome) for outcome in outcomes]}, indent=2))
        return
    for outcome in outcomes:
        detail = outcome.message or (
            f"generation {outcome.generation}" if outcome.generation else ""
        )
        if outcome.pruned:
            detail += f"; pruned {', '.join(outcome.pruned)}"
        click.echo(f"{outcome.job}: {outcome.status}{': ' + detail if detail else ''}")


@click.command("run")
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
@config_option
@click.option("--force", is_flag=True, help="Run the jobs even if their schedule says not due.")
@wait_option
@dry_run_option
@json_option
def run_command(
    jobs: tuple[str, ...], config_path: Path, force: bool, wait: bool, dry_run: bool, as_json: bool
) -> None:
    """Back up every due job (or the JOBs named): the entry point for timers.

    \b
    For each job: lock, clean up after an interrupted run, snapshot, export a full copy
    to the target (temporary name, checksummed, fsynced, manifest last, atomic rename),
    verify, remove the snapshot, record the run, plan retention and prune. A job is due
    when its policy's schedule has fired since its last success; a missed run is caught
    up once. Exit 0 all good, 4 some jobs failed, 5 all failed, 6 a lock was held.
    """
    _run(jobs, config_path, RunOptions(force=force, wait=wait, dry_run=dry_run), as_json)


@click.command("export")
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@config_option
@wait_option
@dry_run_option
@json_option
def export_command(
    jobs: tuple[str, ...], config_path: Path, wait: bool, dry_run: bool, as_json: bool
) -> None:
    """Export a new generation of JOBs now (snapshot, export, verify), without pruning."""
    options = RunOptions(force=True, wait=wait, dry_run=dry_run, prune=False)
    _run(jobs, config_path, options, as_json)


def _run(names: tuple[str, ...], config_path: Path, options: RunOptions, as_json: bool) -> None:
    config = load_config(config_path)
    selected = select_jobs(config, names, members=False)  # domains: found by the run
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    watch = None if options.dry_run else RunWatch(config)
    try:
        if config.concurrency == 1:  # one progress bar at a time
            options = replace(
                options,
                progress=lambda job: progress_for(
                    f"{job.title}: export",
                    lambda: allocated_bytes(backend_for(job.kind).sources(job)),
                ),
            )
        if watch is None:
            outcomes = run_jobs(config, selected, now_utc, options)
        else:
            with watch:
                outcomes = run_jobs(config, selected, now_utc, options)
                # metrics, notification and the run's ping: never change the result
                watch.finish(selected, outcomes, int(exit_code(outcomes)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    _report(outcomes, as_json)
    code = exit_code(outcomes)
    if code != ExitCode.OK:
        raise SystemExit(int(code))


@click.command("snapshot")
@click.argument("jobs", nargs=-1, required=True, shell_complete=complete_jobs)
@config_option
@wait_option
@dry_run_option
def snapshot_command(jobs: tuple[str, ...], config_path: Path, wait: bool, dry_run: bool) -> None:
    """Take a local snapshot of JOBs now, for quick rollback. A snapshot is NOT a backup:
    it lives on the source storage. It is kept as one of the policy's local snapshots."""
    config = load_config(config_path)
    for line in snapshot_jobs(config, select_jobs(config, jobs), now_utc(), wait, dry_run):
        click.echo(line)


@click.command("prune")
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
@config_option
@wait_option
@dry_run_option
@json_option
def prune_command(
    jobs: tuple[str, ...], config_path: Path, wait: bool, dry_run: bool, as_json: bool
) -> None:
    """Delete the generations the retention plan prunes (see `gfs plan`).

    Never the newest verified generation of a job, never a protected one, only inside the
    job's own directory on the target; each deletion is journaled.
    """
    config = load_config(config_path)
    results = prune_jobs(config, select_jobs(config, jobs), now_utc(), wait, dry_run)
    if as_json:
        click.echo(
            json.dumps(
                {name: {"pruned": r.deleted, "spared": r.spared} for name, r in results.items()},
                indent=2,
            )
        )
        return
    verb = "would prune" if dry_run else "pruned"
    for name, result in results.items():
        line = f"{name}: {verb} {len(result.deleted)}"
        if result.deleted:
            line += ": " + ", ".join(result.deleted)
        if result.spared:
            line += "; spared (newest verified or protected): " + ", ".join(result.spared)
        click.echo(line)


@click.command("notify-failure")
@click.argument("unit")
@config_option
def notify_failure_command(unit: str, config_path: Path) -> None:
    """Tell the admin that the systemd UNIT failed: one failure notification on the
    [notify] channels (whatever `on` says) and a /fail ping of the run's ping_url, with the
    unit's last journal lines. For contrib/systemd/gfs-failure@.service, which
    gfs-run.service starts with OnFailure= when gfs itself could not report (killed,
    timed out, crashed). Exit 0 even when a channel failed (each is logged)."""
    unit_failed(load_config(config_path), unit)  # a channel's failure is logged
