"""`gfs restore`, `gfs verify` over jobs, and `gfs protect`: acting on stored generations."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from gfs_backup.actions.cluster import on_its_host
from gfs_backup.actions.reconcile import remove_leftover
from gfs_backup.actions.targets import answering_host, job_location
from gfs_backup.actions.verify import Verified, check_data, verify_stored
from gfs_backup.backends import backend_for
from gfs_backup.backends.base import JobContext, Progress, RestoreOptions
from gfs_backup.backends.libvirt import LibvirtBackend
from gfs_backup.backends.sourcehost import RemoteHost, runs_on_host
from gfs_backup.core.config import LOCAL_HOST, Config, Job
from gfs_backup.core.errors import ExitCode, GfsError, InputError, Problem
from gfs_backup.core.state import State
from gfs_backup.target.catalog import Stored, list_generations
from gfs_backup.target.manifest import write_manifest
from gfs_backup.transport.runner import LocalRunner, Runner
from gfs_backup.transport.ssh import runner_for

log = logging.getLogger("gfs")


STAGING_PREFIX = ".gfs-restore-"  # what a restore writes, beside --to, until it is checked


class RestoreError(GfsError):
    exit_code = ExitCode.FAILED


def find_generation(config: Config, job: Job, generation: str | None) -> Stored:
    """The named generation of `job`, or its newest. InputError if there is none."""
    job_dir, fs = job_location(config, job)
    listing = list_generations(job_dir, fs)
    if not listing.stored:
        raise InputError(Problem(str(job_dir), f"job {job.name} has no generation to use"))
    if generation is None:
        return listing.stored[-1]
    found = listing.by_id().get(generation)
    if found is None:
        known = ", ".join(item.id for item in listing.stored[-5:])
        raise InputError(
            Problem(
                str(job_dir), f"no generation {generation!r} of job {job.name} (newest: {known})"
            )
        )
    return found


def restore(
    config: Config,
    job: Job,
    generation: str | None,
    to: Path,
    now: datetime,
    progress: Progress | None = None,
    options: RestoreOptions | None = None,
) -> Stored:
    """Check the generation's checksums, then restore it to `to` (which must not exist):
    into a temporary name beside it, renamed to `to` once complete and checked, so a
    failed restore leaves nothing at `to` (journaled: a killed one is removed by the next
    run of the job)."""
    if job.options.get("cluster"):  # on the first host that answers
        cluster = str(job.options["cluster"])
        job = replace(job, host=answering_host(config, cluster, job.host))
    if runs_on_host(job, "restore"):
        return _restore_on_host(config, job, generation, to, now, progress, options)
    if to.exists() or to.is_symlink():
        raise InputError(Problem(str(to), "already exists: restore into a new path"))
    if not to.parent.is_dir():
        raise InputError(Problem(str(to), "its parent directory does not exist"))

    def write(ctx: JobContext, stored: Stored) -> str:
        staging = to.parent / f"{STAGING_PREFIX}{to.name}-r{ctx.run_id}"
        entry = ctx.state.journal(ctx.run_id, job.name, "restore", str(staging))
        try:
            backend_for(stored.manifest.kind).restore(
                ctx, stored, staging, progress, replace(options or RestoreOptions(), final=to)
            )
            if to.exists() or to.is_symlink():
                raise RestoreError(f"{to} appeared while restoring: the restore is left unused")
            staging.rename(to)
        except ValueError as exc:
            raise RestoreError(
                f"restore of {stored.id} to {to} does not match its manifest: {exc}"
            ) from None
        except OSError as exc:  # ENOSPC, EPERM (device nodes need root), EIO
            what = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror)
            raise RestoreError(
                f"restore of {stored.id} to {to} failed ({what}); nothing was left at {to}"
            ) from None
        finally:
            remove_leftover(ctx.runner, staging)
            ctx.state.done(entry)
        return str(to)

    return _checked_restore(config, job, generation, now, progress, write)


def _restore_on_host(
    config: Config,
    job: Job,
    generation: str | None,
    to: Path,
    now: datetime,
    progress: Progress | None,
    options: RestoreOptions | None = None,
) -> Stored:
    """A btrfs, files or libvirt job of a remote host: `to` is a path on that host, where
    the stream is received, the tree restored or the disks copied, and checked (the
    backends' restore); the same staging, check and rename as here."""
    host = RemoteHost(job.host, runner_for(job.host, config))
    if host.exists(to):
        raise InputError(
            Problem(f"{to} on host {job.host}", "already exists: restore into a new path")
        )
    if not host.is_dir(to.parent):
        raise InputError(Problem(f"{to} on host {job.host}", "its parent directory does not exist"))

    def write(ctx: JobContext, stored: Stored) -> str:
        staging = to.parent / f"{STAGING_PREFIX}{to.name}-r{ctx.run_id}"
        entry = ctx.state.journal(ctx.run_id, job.name, "restore", str(staging))
        try:
            backend_for(stored.manifest.kind).restore(
                ctx, stored, staging, progress, replace(options or RestoreOptions(), final=to)
            )
            host.rename(staging, to)
        except FileExistsError:
            raise RestoreError(
                f"{to} appeared while restoring: the restore is left unused"
            ) from None
        except ValueError as exc:
            raise RestoreError(
                f"restore of {stored.id} to {to} on host {job.host} does not match its "
                f"manifest: {exc}"
            ) from None
        except OSError as exc:
            raise RestoreError(
                f"restore of {stored.id} to {to} on host {job.host} failed ({exc}); nothing "
                f"was left at {to}"
            ) from None
        finally:
            host.remove_leftover(staging)
            ctx.state.done(entry)
        return f"{to} on host {job.host}"

    return _checked_restore(config, job, generation, now, progress, write, host.runner)


def restore_over_original(
    config: Config,
    job: Job,
    generation: str | None,
    now: datetime,
    progress: Progress | None = None,
) -> Stored:
    """libvirt jobs: check the generation, then write its disks over the disks of the
    job's domain, which must be shut off (see LibvirtBackend.restore_over_original)."""
    if job.kind != LibvirtBackend.kind:
        raise InputError(
            Problem(
                f"job {job.name}",
                f"--over-original is for libvirt jobs; restore a {job.kind} job with --to PATH",
            )
        )

    job, _found = on_its_host(config, job)  # a cluster job: where its domain is now
    runner = runner_for(job.host, config) if job.host != LOCAL_HOST else None

    def write(ctx: JobContext, stored: Stored) -> str:
        if stored.manifest.kind != LibvirtBackend.kind:
            raise RestoreError(f"generation {stored.id} of job {job.name} is not a VM backup")
        disks = LibvirtBackend().restore_over_original(ctx, stored, progress)
        on = f" on host {job.host}" if job.host != LOCAL_HOST else ""
        return ", ".join(disks) + on

    return _checked_restore(config, job, generation, now, progress, write, runner)


def _checked_restore(
    config: Config,
    job: Job,
    generation: str | None,
    now: datetime,
    progress: Progress | None,
    write: Callable[[JobContext, Stored], str],
    runner: Runner | None = None,
) -> Stored:
    """Find the generation, refuse it when its data fails its checksums, then `write` it
    (which returns where it went) and record the restore in the run history."""
    stored = find_generation(config, job, generation)
    problems = check_data(stored, progress) if stored.manifest.files else []
    if problems:
        raise RestoreError(
            f"generation {stored.id} of job {job.name} is damaged, not "
            f"restored: {'; '.join(problems[:3])}"
        )
    state = State(config.state_dir)
    try:
        run_id = state.start_run(job.name)
        ctx = JobContext(job, runner or LocalRunner(), state, run_id, now, log)
        where = write(ctx, stored)
        state.finish_run(ctx.run_id, "restored", stored.id, message=where)
    finally:
        state.close()
    log.info("job %s: restored generation %s to %s", job.name, stored.id, where)
    return stored


def verify_jobs(
    config: Config,
    jobs: list[Job],
    generation: str | None,
    now: datetime,
) -> list[Verified]:
    """Verify one named generation, or every generation of each job; record results."""
    results = []
    for job in jobs:
        if generation is not None:
            targets = [find_generation(config, job, generation)]
        else:
            targets = list_generations(*job_location(config, job)).stored
        for stored in targets:
            result = verify_stored(stored, now)
            verdict = "ok" if result.ok else f"FAILED: {'; '.join(result.problems[:5])}"
            log.info("job %s: verify %s: %s", job.name, stored.id, verdict)
            results.append(result)
    return results


def set_protected(config: Config, job: Job, generation: str, protected: bool) -> Stored:
    stored = find_generation(config, job, generation)
    manifest = replace(stored.manifest, protected=protected)
    write_manifest(stored.path, manifest, stored.fs)
    return replace(stored, manifest=manifest)
