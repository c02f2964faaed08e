"""Finish or undo what an interrupted run left behind, before a job runs again."""

from __future__ import annotations

from pathlib import Path

from gfs_backup.backends.base import Backend, JobContext
from gfs_backup.btrfs import is_subvolume_root, make_delete_command
from gfs_backup.catalog import PARTIAL_PREFIX, PRUNING_PREFIX
from gfs_backup.generation import remove_tree
from gfs_backup.runner import Runner


def reconcile(ctx: JobContext, backend: Backend, job_dir: Path) -> list[str]:
    """Undo open journal entries of earlier runs and sweep dot-named leftovers.

    Returns one line per thing cleaned up. Snapshots are deleted only when the journal
    says gfs made them and they carry gfs's name.
    """
    done: list[str] = []
    interrupted = ctx.state.mark_interrupted(ctx.job.name, except_run=ctx.run_id)
    if interrupted:
        done.append(f"{interrupted} interrupted run(s) recorded")
    for entry in ctx.state.open_entries(ctx.job.name):
        if entry.run_id == ctx.run_id:
            continue
        if entry.action in ("partial", "prune", "drill"):  # all only ever under dot-names
            remove_leftover(ctx.runner, Path(entry.path))
            ctx.state.done(entry.id)
            done.append(f"removed leftover {entry.action} {entry.path}")
        else:  # the backend's own: a snapshot, a hypervisor backup job, ...
            backend.undo_entry(ctx, entry)
            done.append(f"undid leftover {entry.action} {entry.path}")
    if job_dir.is_dir():
        for path in sorted(job_dir.iterdir()):
            if path.name.startswith((PARTIAL_PREFIX, PRUNING_PREFIX)):
                remove_tree(path)
                done.append(f"removed unjournaled leftover {path}")
    for line in done:
        ctx.log.info("job %s: reconcile: %s", ctx.job.name, line)
    return done


def remove_leftover(runner: Runner, path: Path) -> None:
    """Remove a dot-named leftover tree; btrfs subvolumes in it (a drill's) first."""
    if path.is_dir() and path.name.startswith("."):
        for child in path.iterdir():
            if is_subvolume_root(child):
                runner.run(make_delete_command(child), check=False)
    remove_tree(path)
