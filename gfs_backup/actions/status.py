"""`gfs list`, `gfs status`, and the health warnings of `gfs check`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from gfs_backup.actions.run import next_due
from gfs_backup.actions.targets import job_location
from gfs_backup.actions.verify import last_verified_ok
from gfs_backup.backends import backend_for
from gfs_backup.backends.vm_capture import capture_of
from gfs_backup.core.config import Config, Job
from gfs_backup.core.errors import GfsError, Problem
from gfs_backup.core.state import RunRecord, State
from gfs_backup.target.catalog import Listing, Stored, list_generations
from gfs_backup.target.checks import check_target
from gfs_backup.target.fs import TargetFS


def generation_size(stored: Stored) -> int:
    """Logical bytes of a generation's data (files and file tree; a hard link once)."""
    size = sum(data.size for data in stored.manifest.files)
    tree = stored.manifest.tree
    return size + sum(int(item.get("size", 0)) for item in tree if not item.get("link"))


def skipped_count(stored: Stored) -> int:
    """Objects a files export left out (sockets, other filesystems, vanished files)."""
    skipped = stored.manifest.source.get("skipped", [])
    return len(skipped) if isinstance(skipped, list) else 0


def capture_summary(stored: Stored) -> str:
    """ "incremental from ID: read N MiB, wrote N MiB, new N MiB" or "full: read ..."."""
    capture = capture_of(stored)
    if not capture:
        return ""
    mib = 1 << 20

    def amount(key: str) -> str:
        value = capture.get(key)
        return f"{int(value) // mib:,d} MiB" if isinstance(value, int) else "?"

    how = (
        f"incremental from {capture.get('base')}"
        if capture.get("mode") == "incremental"
        else "full"
    )
    kept = f", keeps thin snapshot {capture['snapshot']}" if capture.get("snapshot") else ""
    return (
        f"{how}: read {amount('bytes_read')}, wrote {amount('bytes_written')}, "
        f"new {amount('new_bytes')}{kept}"
    )


@dataclass(frozen=True)
class JobStatus:
    job: Job
    job_dir: Path
    listing: Listing
    last_run: RunRecord | None
    last_success: RunRecord | None
    next_due: datetime | None
    warnings: list[str] = field(default_factory=list)
    last_drill: RunRecord | None = None


def job_status(
    config: Config, job: Job, state: State | None, now: datetime, health: bool = True
) -> JobStatus:
    """The job's generations, runs and, with `health`, its warnings (target checks, the
    backend's own: a libvirt connection per job, SSH round trips for a remote target)."""
    job_dir, fs = job_location(config, job)
    try:
        listing = list_generations(job_dir, fs)
    except GfsError as exc:  # a remote target that does not answer: say so, go on
        listing = Listing([], [Problem(str(job_dir), str(exc))])
    runs = state.runs(job.name, 1) if state is not None else []
    last_success = state.last_success(job.name) if state is not None else None
    last_drill = state.last_drill(job.name) if state is not None else None
    warnings = [str(problem) for problem in listing.problems]
    if health:
        warnings += health_warnings(config, job, listing, state, now)
    if last_drill is not None and last_drill.status == "drill-failed":
        warnings.append(
            f"job {job.title}: the last drill (generation {last_drill.generation}) failed: "
            f"{last_drill.message}"
        )
    return JobStatus(
        job,
        job_dir,
        listing,
        runs[0] if runs else None,
        last_success,
        _next_due(job, state, job_dir, now, fs),
        warnings,
        last_drill,
    )


def _next_due(
    job: Job, state: State | None, job_dir: Path, now: datetime, fs: TargetFS
) -> datetime | None:
    try:
        return next_due(job, state, job_dir, now, fs)
    except GfsError:  # reported with the listing
        return None


def health_warnings(
    config: Config, job: Job, listing: Listing, state: State | None, now: datetime
) -> list[str]:
    """What monitoring should hear about: stale backups, unverified data, targets that
    are not NFS or not mounted, gfs snapshots left without an export."""
    warnings = []
    target = config.targets[job.target]
    try:
        check = check_target(
            target, backend_for(job.kind).sources(job), fs=job_location(config, job)[1]
        )
        warnings += check.warnings
    except GfsError as exc:
        warnings.append(str(exc))
    warnings += backend_for(job.kind).health(job)
    schedule = job.policy.schedule
    if not listing.stored:
        warnings.append(f"job {job.title}: no generation on target {target.name} yet")
    else:
        newest = listing.stored[-1]
        due = schedule.next_after(newest.manifest.created_at, job.policy.zone)
        overdue = schedule.next_after(due, job.policy.zone) if due else None
        if overdue is not None and overdue <= now:
            warnings.append(
                f"job {job.title}: newest generation {newest.id} is older than "
                f"its schedule {schedule.text!r} allows (missed runs)"
            )
        if not last_verified_ok(newest):
            warnings.append(f"job {job.title}: newest generation {newest.id} is not verified")
        damaged = [
            item.id
            for item in listing.stored
            if item.manifest.verify and item.manifest.verify[-1].get("result") != "ok"
        ]
        if damaged:
            warnings.append(
                f"job {job.title}: generation(s) {', '.join(damaged)} failed verification"
            )
        for item in listing.stored:
            for disk, alarm in capture_of(item).get("alarm", {}).items():
                warnings.append(
                    f"job {job.title}: generation {item.id}, disk {disk}: dirty-tracking "
                    f"alarm: {alarm}; the full read is the one to trust, report this"
                )
    if state is not None:
        for entry in state.open_entries(job.name):
            if entry.action == "snapshot" and Path(entry.path).exists():
                warnings.append(
                    f"job {job.title}: gfs snapshot {entry.path} has no export "
                    "(an interrupted run; the next run removes it)"
                )
    return warnings
