"""Single steps of the pipeline: `gfs snapshot` and `gfs prune`."""

from __future__ import annotations

import logging
from datetime import datetime

from gfs_backup.actions.prune import PruneResult, journaled_delete, prune_job
from gfs_backup.actions.reconcile import reconcile
from gfs_backup.actions.targets import job_location
from gfs_backup.backends import backend_for
from gfs_backup.backends.base import JobContext
from gfs_backup.core.config import Config, Job
from gfs_backup.core.errors import GfsError
from gfs_backup.core.lock import job_lock
from gfs_backup.core.state import State
from gfs_backup.transport.ssh import close_runners, runner_for

log = logging.getLogger("gfs")


def snapshot_jobs(
    config: Config, jobs: list[Job], now: datetime, wait: bool, dry_run: bool
) -> list[str]:
    """Take a local snapshot of each job, kept as one of its policy's local snapshots."""
    lines = []
    state = State(config.state_dir)
    try:
        for job in jobs:
            backend = backend_for(job.kind)
            if dry_run:
                lines.append(f"{job.name}: would snapshot {backend.sources(job)[0]}")
                continue
            with job_lock(config.state_dir, job.name, wait):
                run_id = state.start_run(job.name)
                ctx = JobContext(job, runner_for(job.host, config), state, run_id, now, log)
                backend.check_source(ctx)
                snapshot = backend.snapshot(ctx)
                if snapshot is None:
                    state.finish_run(run_id, "failed", message="cannot snapshot")
                    raise GfsError(
                        f"job {job.name}: {backend.sources(job)[0]} is not on "
                        "btrfs: it cannot be snapshotted"
                    )
                backend.retire_snapshot(ctx, snapshot, max(job.policy.keep_snapshots, 1))
                state.finish_run(run_id, "snapshot", message=str(snapshot.subvolume))
                lines.append(f"{job.name}: snapshot {snapshot.subvolume} (local, not a backup)")
    finally:
        state.close()
        close_runners()
    return lines


def prune_jobs(
    config: Config, jobs: list[Job], now: datetime, wait: bool, dry_run: bool
) -> dict[str, PruneResult]:
    """Prune each job as its plan says (reconciling leftovers first unless dry-run)."""
    results: dict[str, PruneResult] = {}
    state = State(config.state_dir) if not dry_run else None
    try:
        for job in jobs:
            job_dir, fs = job_location(config, job, dry_run)
            if dry_run:
                results[job.name] = prune_job(job, job_dir, now, None, fs)
                continue
            assert state is not None
            with job_lock(config.state_dir, job.name, wait):
                run_id = state.start_run(job.name)
                runner = runner_for(job.host, config)
                ctx = JobContext(job, runner, state, run_id, now, log, target=fs)
                reconcile(ctx, backend_for(job.kind), job_dir)
                results[job.name] = prune_job(job, job_dir, now, journaled_delete(ctx), fs)
                state.finish_run(
                    run_id, "pruned", message=f"pruned {len(results[job.name].deleted)}"
                )
    finally:
        if state is not None:
            state.close()
        close_runners()
    return results
