"""`gfs run`: for each due job, lock, reconcile, snapshot, export, verify, publish,
retire the snapshot, record the run, plan retention, prune."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from gfs_backup.actions.cluster import (
    Located,
    check_unmoved,
    explain_failure_in_cluster,
    on_its_host,
)
from gfs_backup.actions.drill import periodic_drill
from gfs_backup.actions.members import (
    Selection,
    adopt_history,
    histories,
    list_domains,
    overlapping,
    select,
)
from gfs_backup.actions.prune import journaled_delete, prune_job
from gfs_backup.actions.reconcile import reconcile
from gfs_backup.actions.targets import job_location
from gfs_backup.actions.verify import check_data, last_check_time, verify_stored
from gfs_backup.backends import backend_for
from gfs_backup.backends.base import Backend, Exported, JobContext, Progress, Snapshot
from gfs_backup.core.config import Config, Job
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.core.faults import crash_point
from gfs_backup.core.lock import LockHeld, job_lock
from gfs_backup.core.state import State
from gfs_backup.core.throttle import Throttle, format_rate, shares
from gfs_backup.ops.hooks import Hooks, run_hook
from gfs_backup.ops.pings import Pinger
from gfs_backup.ops.settings import ops_of
from gfs_backup.retention import Generation, plan
from gfs_backup.target.catalog import Stored, list_generations, newest_verified
from gfs_backup.target.checks import check_target
from gfs_backup.target.fs import LOCAL_FS, TargetFS, TargetStalled
from gfs_backup.target.generation import PartialGeneration, generation_id
from gfs_backup.target.manifest import Manifest
from gfs_backup.transport.ssh import close_runners, runner_for

log = logging.getLogger("gfs")
Clock = Callable[[], datetime]
ProgressFactory = Callable[[Job], Progress | None]


class ExportError(GfsError):
    exit_code = ExitCode.FAILED


class HookFailed(GfsError):
    """The job's `before` hook failed: the job stops before its snapshot."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class RunOptions:
    force: bool = False  # run even when the schedule says the job is not due
    wait: bool = False  # wait for a held lock instead of giving up
    dry_run: bool = False
    prune: bool = True
    progress: ProgressFactory | None = None


@dataclass
class JobOutcome:
    job: str
    status: str  # ok | failed | locked | not-due | dry-run
    generation: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    path: str | None = None  # the published generation's directory


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def exit_code(outcomes: list[JobOutcome]) -> ExitCode:
    """0 all good; 5 every job that ran failed; 4 some failed; 6 a lock was held."""
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        worked = [o for o in outcomes if o.status in ("ok", "not-due", "dry-run")]
        return ExitCode.PARTIAL if worked else ExitCode.FAILED
    if any(o.status == "locked" for o in outcomes):
        return ExitCode.LOCKED
    return ExitCode.OK


def next_due(
    job: Job, state: State | None, job_dir: Path, now: datetime, fs: TargetFS = LOCAL_FS
) -> datetime | None:
    """When the job is due next: after its last success (or newest generation on the
    target, for a fresh machine); `now` if it never ran. A missed run is caught up once."""
    last = state.last_success(job.name) if state is not None else None
    reference = last.started_at if last is not None else None
    if reference is None:
        stored = list_generations(job_dir, fs).stored
        reference = stored[-1].manifest.created_at if stored else None
    if reference is None:
        return now
    return job.policy.schedule.next_after(reference, job.policy.zone)


def run_jobs(
    config: Config,
    jobs: list[Job],
    clock: Clock,
    options: RunOptions,
) -> list[JobOutcome]:
    """Run each job, up to `config.concurrency` at once; one failing job never stops the
    others. Results come in the order of `jobs`."""

    rates = shares(
        {name: target.bandwidth for name, target in config.targets.items()},
        (job.target for job in jobs),
        config.concurrency,
    )

    parents = {job.name: job for job in config.jobs}

    def one(job: Job) -> JobOutcome:
        state = State.read_only(config.state_dir) if options.dry_run else State(config.state_dir)
        rate = rates.get(job.target, 0)
        if job.parent is not None:  # the domains of a job share its share of the target
            rate //= int(parents[job.parent].options.get("max_parallel", 1))
        try:
            return _run_one(config, job, state, clock, options, rate)
        finally:
            if state is not None:
                state.close()

    selections = select_all(config, jobs)

    def unit(job: Job) -> list[JobOutcome]:
        if not job.selects_domains:
            return [one(job)]
        url = None if options.dry_run else ops_of(config).job(job.name).ping_url
        return _run_members(job, selections[job.name], one, url)

    try:
        if config.concurrency <= 1 or len(jobs) <= 1:
            done = [unit(job) for job in jobs]
        else:
            with ThreadPoolExecutor(config.concurrency, thread_name_prefix="gfs") as pool:
                done = list(pool.map(unit, jobs))
        return [outcome for outcomes in done for outcome in outcomes]
    finally:
        close_runners()  # the SSH connections the jobs shared


def select_all(config: Config, jobs: list[Job]) -> dict[str, Selection | GfsError]:
    """What each pattern job among `jobs` backs up (or why it cannot say), with a domain
    that jobs of the whole configuration both select made a problem of each (backed up by
    none until the patterns are exclusive: two histories of one domain would fight over
    its checkpoints)."""
    selections: dict[str, Selection | GfsError] = {}
    wanted = {job.name for job in jobs}
    for job in config.jobs:
        if not job.selects_domains:
            continue
        try:
            selections[job.name] = select(job, list_domains(config, job), histories(config, job))
        except GfsError as exc:
            selections[job.name] = exc
    found = {name: s for name, s in selections.items() if isinstance(s, Selection)}
    singles = [job for job in config.jobs if job.kind == "libvirt" and not job.selects_domains]
    for uuid, claims in overlapping(found, singles).items():
        for name in claims:
            selection = found.get(name)
            if selection is None:
                continue
            for one in selection.members:
                if one.options["uuid"] == uuid:
                    selection.problems[one.name] = (
                        f"domain {one.options['domain']} is selected by jobs "
                        f"{' and '.join(claims)}: backed up by none of them until one "
                        "excludes it (exclude = [...])"
                    )
    return {name: s for name, s in selections.items() if name in wanted}


def _run_members(
    job: Job,
    selection: Selection | GfsError,
    one: Callable[[Job], JobOutcome],
    ping_url: str | None = None,
) -> list[JobOutcome]:
    """The domains of a pattern job, up to `max_parallel` at once; one failing domain
    fails only its own outcome. libvirtd not answering fails the job (nothing vanishes).
    The job's dead-man ping is one for all its domains: a failure if any failed."""
    pinger = Pinger(ping_url, log) if ping_url else None
    if pinger is not None:
        pinger.start()
    outcomes = _member_outcomes(job, selection, one)
    if pinger is not None:
        failed = [o for o in outcomes if o.status == "failed"]
        body = "".join(f"{o.job}: {o.status} {o.message}\n" for o in outcomes)
        (pinger.fail if failed else pinger.success)(f"job {job.name}:\n{body}")
    return outcomes


def _member_outcomes(
    job: Job, selection: Selection | GfsError, one: Callable[[Job], JobOutcome]
) -> list[JobOutcome]:
    if isinstance(selection, GfsError):
        message = f"cannot list the domains to back up: {selection}"
        log.error("job %s: failed: %s", job.name, message)
        return [JobOutcome(job.name, "failed", message=message)]
    for warning in selection.warnings:
        log.warning("job %s: %s", job.name, warning)
    for name, why in selection.left_out:
        log.info("job %s: domain %s left out: %s", job.name, name, why)
    for gone in selection.vanished:
        log.info(
            "job %s: domain %s (UUID %s) is gone: its generations are kept (gfs forget "
            "%s %s deletes them)",
            job.name,
            gone.options["domain"],
            gone.options["uuid"],
            job.name,
            gone.options["uuid"],
        )

    def member_outcome(member: Job) -> JobOutcome:
        problem = selection.problems.get(member.name)
        if problem is None:
            return one(member)
        log.error("job %s: failed: %s", member.title, problem)
        return JobOutcome(member.title, "failed", message=problem)

    parallel = int(job.options.get("max_parallel", 1))
    if parallel <= 1 or len(selection.members) <= 1:
        outcomes = [member_outcome(member) for member in selection.members]
    else:
        with ThreadPoolExecutor(parallel, thread_name_prefix=f"gfs-{job.name}") as pool:
            outcomes = list(pool.map(member_outcome, selection.members))
    if not outcomes:
        outcomes = [JobOutcome(job.name, "not-due", message="no domain selected")]
    if selection.warnings:
        outcomes[0].warnings += selection.warnings
    return outcomes


def _run_one(
    config: Config,
    job: Job,
    state: State | None,
    clock: Clock,
    options: RunOptions,
    bandwidth: int = 0,
) -> JobOutcome:
    if not options.dry_run and job.options.get("cluster"):
        assert state is not None
        try:
            job, _found = on_its_host(config, job)
        except GfsError as exc:
            state.finish_run(state.start_run(job.name), "failed", message=str(exc))
            log.error("job %s: failed: %s", job.title, exc)
            return JobOutcome(job.title, "failed", message=str(exc))
    job_dir, fs = job_location(config, job, options.dry_run)
    if options.dry_run:
        return _preview(config, job, state, job_dir, clock(), fs)
    assert state is not None
    try:
        with job_lock(config.state_dir, job.name, options.wait):
            now = clock()
            try:
                adopt_history(job, job_dir, fs)  # a renamed domain of a pattern job
                due = next_due(job, state, job_dir, now, fs)
            except (GfsError, OSError) as exc:  # a target that does not answer, or vanished
                message = describe_failure(exc, config, job)
                state.finish_run(state.start_run(job.name), "failed", message=message)
                log.error("job %s: failed: %s", job.title, message)
                return JobOutcome(job.title, "failed", message=message)
            if not options.force and (due is None or due > now):
                when = due.isoformat() if due else "never (the schedule does not fire)"
                return JobOutcome(job.title, "not-due", message=f"next due {when}")
            return _run_locked(config, job, state, (job_dir, fs), now, options, bandwidth)
    except LockHeld as exc:
        log.warning("%s", exc)
        return JobOutcome(job.title, "locked", message=str(exc))


def _run_locked(
    config: Config,
    job: Job,
    state: State,
    location: tuple[Path, TargetFS],
    now: datetime,
    options: RunOptions,
    bandwidth: int = 0,
) -> JobOutcome:
    job_dir, fs = location
    run_id = state.start_run(job.name)
    runner = runner_for(job.host, config)
    ctx = JobContext(job, runner, state, run_id, now, log, bandwidth=bandwidth, target=fs)
    backend = backend_for(job.kind)
    ops = ops_of(config).job(job.family)
    # A domain of a `domains` job: the job pings once for all of them (_run_members).
    pinger = Pinger(ops.ping_url, log) if ops.ping_url and job.parent is None else None
    if pinger is not None:
        pinger.start()
    started = time.monotonic()
    try:
        outcome = _pipeline(ctx, backend, config, job_dir, options)
    except Exception as exc:  # one job's failure, whatever it is, is recorded and reported
        message = describe_failure(exc, config, job)
        seconds = time.monotonic() - started
        state.finish_run(run_id, "failed", seconds=seconds, message=message)
        log.error("job %s: failed: %s", job.title, message)
        log.debug("job %s: failure details", job.title, exc_info=True)
        env = hook_env(job, job_dir, status="failed")
        warnings = _hook_warnings(ops.hooks, ("on_failure", "after"), env)
        if pinger is not None:
            pinger.fail(
                f"job {job.title}: failed: {message}\n"
                + "".join(f"warning: {warning}\n" for warning in warnings)
            )
        return JobOutcome(job.title, "failed", seconds=seconds, message=message, warnings=warnings)
    env = hook_env(job, Path(outcome.path) if outcome.path else job_dir, outcome.generation, "ok")
    outcome.warnings += _hook_warnings(ops.hooks, ("after",), env)
    if pinger is not None:
        pinger.success(
            f"job {job.title}: generation {outcome.generation}, {outcome.bytes} bytes\n"
            + "".join(f"warning: {warning}\n" for warning in outcome.warnings)
        )
    outcome.seconds = time.monotonic() - started
    state.finish_run(
        run_id,
        "ok",
        outcome.generation,
        outcome.bytes,
        outcome.seconds,
        "; ".join(outcome.warnings) or None,
    )
    log.info(
        "job %s: done: generation %s, %d bytes in %.1f s, pruned %d",
        job.title,
        outcome.generation,
        outcome.bytes,
        outcome.seconds,
        len(outcome.pruned),
    )
    return outcome


def hook_env(
    job: Job, path: Path, generation: str | None = None, status: str = "running"
) -> dict[str, str]:
    """The environment a job's hooks get (GFS_PHASE is added by run_hook)."""
    env = {
        "GFS_JOB": job.family,
        "GFS_KIND": job.kind,
        "GFS_STATUS": status,
        "GFS_TARGET_PATH": str(path),
        "GFS_GENERATION": generation or "",
    }
    if job.kind == "libvirt":
        env["GFS_DOMAIN"] = str(job.options.get("domain", ""))
    return env


def _hook_warnings(hooks: Hooks, phases: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """Run the hooks of `phases` in order; their failures as warnings (a hook after the
    snapshot never fails the backup)."""
    warnings = []
    for phase in phases:
        result = run_hook(hooks, phase, env, log)
        if result is not None and not result.ok:
            warnings.append(result.problem)
    return warnings


def describe_failure(exc: Exception, config: Config, job: Job) -> str:
    full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    if full or "No space left on device" in str(exc):  # also as QEMU/libvirt report it
        target = config.targets[job.target]
        return (
            f"target {target.name} ({target.path}) is full (no space left on device) "
            "while exporting: the partial export was removed, earlier generations are "
            "untouched; free space or prune, then run again"
        )
    if isinstance(exc, GfsError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    return f"internal error: {type(exc).__name__}: {exc}"


def _pipeline(
    ctx: JobContext, backend: Backend, config: Config, job_dir: Path, options: RunOptions
) -> JobOutcome:
    job = ctx.job
    fs = ctx.target
    hooks = ops_of(config).job(job.family).hooks
    result = run_hook(hooks, "before", hook_env(job, job_dir), ctx.log)
    if result is not None and not result.ok:
        raise HookFailed(f"{result.problem}; no snapshot was taken")
    reconcile(ctx, backend, job_dir)
    backend.check_source(ctx)
    target = check_target(config.targets[job.target], backend.sources(job), fs=fs)
    warnings = list(target.warnings)
    progress = options.progress(job) if options.progress else None
    if ctx.bandwidth:
        ctx.log.info(
            "job %s: writing at most %s to target %s",
            job.title,
            format_rate(ctx.bandwidth),
            job.target,
        )
        progress = _throttled(progress, Throttle(ctx.bandwidth))
    snapshot = backend.snapshot(ctx)
    crash_point("after-snapshot")
    hook_warnings = _hook_warnings(hooks, ("after_snapshot",), hook_env(job, job_dir))
    try:
        listing = list_generations(job_dir, fs)
        previous = newest_verified(listing.stored)  # what a new export may build on
        partial = PartialGeneration(
            job_dir, generation_id(ctx.now, job_dir, fs), ctx.state, ctx.run_id, job.name, fs
        )
        ctx.log.info("job %s: exporting to %s", job.title, partial.path)
        try:
            try:
                exported = backend.export(
                    ctx, snapshot, partial.path, previous, _with_crash_point(progress)
                )
            except GfsError as exc:
                if job.options.get("cluster"):
                    explain_failure_in_cluster(config, job, exc)
                raise
            manifest = _manifest(ctx, partial, exported, listing.generations)
            if job.options.get("cluster"):
                running = exported.source.get("state") == "running"
                backed_up = Located(job.host, running, str(exported.source.get("uuid")))
                check_unmoved(config, job, backed_up)
            crash_point("before-publish")
            shared = config.targets[job.target].read_group if job.kind == "libvirt" else None
            partial.publish(manifest, shared)
        except BaseException as exc:
            _abort(ctx, partial, exc)
            raise
    finally:
        if snapshot is not None:
            _retire(ctx, backend, snapshot)
    published = job_dir / partial.generation
    env = hook_env(job, published, partial.generation, "ok")
    hook_warnings += _hook_warnings(hooks, ("after_export",), env)
    warnings += exported.warnings
    for warning in warnings:
        ctx.log.warning("job %s: %s", job.title, warning)
    warnings += hook_warnings  # logged by run_hook
    pruned: list[str] = []
    if options.prune:
        pruned = prune_job(job, job_dir, ctx.now, journaled_delete(ctx), fs).deleted
    warnings += periodic_verify(job, job_dir, ctx.now, fs)
    warnings += periodic_drill(job, job_dir, ctx.state, ctx.now, fs)
    return JobOutcome(
        job.title,
        "ok",
        partial.generation,
        exported.bytes_written,
        warnings=warnings,
        pruned=pruned,
        path=str(published),
    )


def _abort(ctx: JobContext, partial: PartialGeneration, why: BaseException) -> None:
    """Remove the partial export; if the target cannot do that now (a hung NFS server:
    not even tried after it stopped answering), its journal entry stays open and the next
    run removes it."""
    reason = "the target does not answer"
    if not isinstance(why, TargetStalled):
        try:
            partial.abort()
            return
        except GfsError as exc:
            reason = str(exc)
    ctx.log.warning(
        "job %s: partial export %s left for the next run to remove (%s)",
        ctx.job.title,
        partial.path,
        reason,
    )


def periodic_verify(job: Job, job_dir: Path, now: datetime, fs: TargetFS = LOCAL_FS) -> list[str]:
    """Re-verify each generation whose policy verify schedule fired since its last check.

    Returns a warning per damaged generation (it stays; a human decides).
    """
    schedule = job.policy.verify_schedule
    if schedule is None:
        return []
    warnings = []
    for stored in list_generations(job_dir, fs).stored:
        due = schedule.next_after(last_check_time(stored), job.policy.zone)
        if due is None or due > now:
            continue
        result = verify_stored(stored, now)
        if not result.ok:
            warnings.append(
                f"generation {stored.id} failed verification: {'; '.join(result.problems[:3])}"
            )
            log.error("job %s: %s", job.title, warnings[-1])
    return warnings


def _throttled(progress: Progress | None, throttle: Throttle) -> Progress:
    """Progress that paces the export: the copy waits while it is ahead of the rate."""

    def step(count: int) -> None:
        throttle.consume(count)
        if progress is not None:
            progress(count)

    return step


def _with_crash_point(progress: Progress | None) -> Progress:
    """Progress that passes the `mid-export` crash point with every chunk of data."""

    def step(count: int) -> None:
        crash_point("mid-export")
        if progress is not None:
            progress(count)

    return step


def _manifest(
    ctx: JobContext, partial: PartialGeneration, exported: Exported, existing: list[Generation]
) -> Manifest:
    """The new generation's manifest: verified (if the policy says so) and labelled."""
    job = ctx.job
    manifest = Manifest(
        job=job.family,
        kind=job.kind,
        host=job.host,
        generation=partial.generation,
        created_at=ctx.now,
        files=exported.files,
        tree=exported.tree,
        point_in_time=exported.point_in_time,
        source=exported.source,
        digest_algorithm=exported.digest_algorithm,
        warnings=exported.warnings,
        drill_check=drill_check(job) if job.kind == "libvirt" else {},
    )
    if job.policy.verify_after_export:
        stored = Stored(partial.path, manifest, partial.fs)
        problems = check_data(stored, read_back=exported.read_back)
        if problems:
            raise ExportError(
                f"job {job.title}: the export does not read back as written: "
                f"{'; '.join(problems[:3])}"
            )
        stamp = ctx.now.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        record: dict[str, object] = {"time": stamp, "result": "ok", "problems": []}
        if exported.verify_scope != "full":
            record["scope"] = exported.verify_scope
        manifest = manifest.with_verify(record)
    new = Generation(partial.generation, ctx.now)
    result = plan([*existing, new], job.policy.rules, ctx.now, job.policy.zone)
    labels = next((kept.labels for kept in result.keep if kept.generation is new), ())
    return replace(manifest, labels=labels)


def drill_check(job: Job) -> dict[str, object]:
    """The policy's VM drill check, kept in each generation for drills away from the host."""
    settings = job.policy.drill
    return {
        "console": settings.console,
        "agent": settings.agent,
        "timeout": settings.timeout,
        "memory": settings.memory_mib,
        "accel": settings.accel,
        "commands": [list(argv) for argv in settings.commands],
        "ports": list(settings.ports),
    }


def _retire(ctx: JobContext, backend: Backend, snapshot: Snapshot) -> None:
    try:
        backend.retire_snapshot(ctx, snapshot, ctx.job.policy.keep_snapshots)
    except GfsError as exc:  # the journal keeps it open: the next run removes it
        ctx.log.warning(
            "job %s: could not remove snapshot %s now: %s", ctx.job.title, snapshot.subvolume, exc
        )


def _preview(
    config: Config,
    job: Job,
    state: State | None,
    job_dir: Path,
    now: datetime,
    fs: TargetFS = LOCAL_FS,
) -> JobOutcome:
    """--dry-run: say what a run would do; write nothing, not even the state database."""
    backend = backend_for(job.kind)
    warnings: list[str] = []
    due = next_due(job, state, job_dir, now, fs)
    if due is not None and due > now:
        warnings.append(f"not due until {due.isoformat()} (a real run needs --force)")
    target = check_target(config.targets[job.target], backend.sources(job), fs=fs)
    warnings += target.warnings
    listing = list_generations(job_dir, fs)
    new = Generation("(new)", now)
    result = plan([*listing.generations, new], job.policy.rules, now, job.policy.zone)
    pruned = [gen.id for gen in result.prune]
    log.info(
        "job %s: dry-run: would snapshot %s and export it to %s/.partial-*",
        job.title,
        ", ".join(str(p) for p in backend.sources(job)),
        job_dir,
    )
    for generation in pruned:
        log.info("job %s: dry-run: would prune %s", job.title, generation)
    return JobOutcome(job.title, "dry-run", warnings=warnings, pruned=pruned)
