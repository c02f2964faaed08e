"""`gfs prune`: delete exactly what the plan names, with every safety rule on top."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from gfs_backup.backends.base import JobContext
from gfs_backup.core.config import Job
from gfs_backup.retention import Plan, plan
from gfs_backup.target.catalog import list_generations, newest_verified
from gfs_backup.target.fs import LOCAL_FS, TargetFS
from gfs_backup.target.generation import delete_generation

log = logging.getLogger("gfs")


@dataclass(frozen=True)
class PruneResult:
    plan: Plan
    deleted: list[str] = field(default_factory=list)
    spared: list[str] = field(default_factory=list)  # planned, but a safety rule said no


def prune_job(
    job: Job,
    job_dir: Path,
    now: datetime,
    delete: Callable[[Path], None] | None,
    fs: TargetFS = LOCAL_FS,
) -> PruneResult:
    """Plan the job's generations (on `fs`) and delete what the plan prunes (`delete`
    None: dry-run).

    Never the newest verified generation, never a protected one, only directories of
    this job's own directory on the target.
    """
    listing = list_generations(job_dir, fs)
    result = plan(listing.generations, job.policy.rules, now, job.policy.zone)
    newest = newest_verified(listing.stored)
    keep_anyway = newest.id if newest is not None else None
    stored = listing.by_id()
    deleted: list[str] = []
    spared: list[str] = []
    for generation in result.prune:
        item = stored[generation.id]
        if generation.id == keep_anyway or item.manifest.protected or item.path.parent != job_dir:
            spared.append(generation.id)
            continue
        if delete is None:
            log.info("job %s: dry-run: would prune %s", job.name, generation.id)
        else:
            delete(item.path)
            log.info("job %s: pruned %s", job.name, generation.id)
        deleted.append(generation.id)
    return PruneResult(result, deleted, spared)


def journaled_delete(ctx: JobContext) -> Callable[[Path], None]:
    """Deletion of generations journaled under the context's run."""
    return lambda path: delete_generation(path, ctx.state, ctx.run_id, ctx.job.name, ctx.target)
