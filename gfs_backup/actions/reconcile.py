"""Finish or undo what an interrupted run left behind, before a job runs again."""

from __future__ import annotations

from pathlib import Path

from gfs_backup.backends.base import Backend, JobContext
from gfs_backup.backends.sourcehost import runs_on_host, source_host
from gfs_backup.target.catalog import PARTIAL_PREFIX, PRUNING_PREFIX
from gfs_backup.target.fs import LOCAL_FS, TargetFS
from gfs_backup.tools.btrfs import is_subvolume_root, make_delete_command
from gfs_backup.transport.runner import Runner


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
        if entry.action in ("restore", "drill") and runs_on_host(ctx.job, entry.action):
            source_host(ctx).remove_leftover(Path(entry.path))
            ctx.state.done(entry.id)
            done.append(f"removed leftover {entry.action} {entry.path} on host {ctx.job.host}")
        elif entry.action in ("partial", "prune", "drill", "restore"):  # only dot-names
            fs = LOCAL_FS if entry.action in ("drill", "restore") else ctx.target
            remove_leftover(ctx.runner, Path(entry.path), fs)
            ctx.state.done(entry.id)
            done.append(f"removed leftover {entry.action} {entry.path}")
        else:  # the backend's own: a snapshot, a hypervisor backup job, ...
            backend.undo_entry(ctx, entry)
            done.append(f"undid leftover {entry.action} {entry.path}")
    for found in ctx.target.entries(job_dir):
        if found.name.startswith((PARTIAL_PREFIX, PRUNING_PREFIX)):
            ctx.target.remove_tree(job_dir / found.name)
            done.append(f"removed unjournaled leftover {job_dir / found.name}")
    for line in done:
        ctx.log.info("job %s: reconcile: %s", ctx.job.name, line)
    return done


def remove_leftover(runner: Runner, path: Path, fs: TargetFS = LOCAL_FS) -> None:
    """Remove a dot-named leftover tree or file (on `fs`); btrfs subvolumes (a drill's or
    a restore's, always on this machine): the path itself, or those in it, first."""
    if fs is LOCAL_FS and path.name.startswith("."):
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
            return
        if is_subvolume_root(path):
            runner.run(make_delete_command(path), check=False)
        elif path.is_dir():
            for child in path.iterdir():
                if is_subvolume_root(child):
                    runner.run(make_delete_command(child), check=False)
    fs.remove_tree(path)
