"""btrfs snapshots as gfs makes them: journaled first, gfs-named, deleted only if ours."""

from __future__ import annotations

from pathlib import Path

from gfs_backup.backends.base import (
    JobContext,
    Snapshot,
    SourceError,
    is_own_snapshot,
    snapshot_name,
)
from gfs_backup.backends.sourcehost import source_host
from gfs_backup.core.config import Job
from gfs_backup.core.state import JournalEntry
from gfs_backup.tools.btrfs import (
    make_delete_command,
    make_show_command,
    make_snapshot_command,
    parse_subvolume_show,
)

SNAPSHOT_DIR = ".gfs-snapshots"


def snapshot_dir(ctx: JobContext, subvolume: Path) -> Path:
    configured = ctx.job.options.get("snapshot_dir")
    return Path(configured) if configured else subvolume / SNAPSHOT_DIR


def take_snapshot(ctx: JobContext, subvolume: Path, inside: Path | None = None) -> Snapshot:
    """Read-only snapshot of `subvolume`; `inside` is the path to export within it."""
    folder = snapshot_dir(ctx, subvolume)
    path = folder / snapshot_name(ctx.job.name, ctx.now, ctx.run_id)
    entry = ctx.state.journal(ctx.run_id, ctx.job.name, "snapshot", str(path))
    if not ctx.runner.dry_run:
        host = source_host(ctx)
        if not host.is_dir(folder):
            host.make_quiet_dir(folder)
    ctx.runner.run(make_snapshot_command(subvolume, path))
    ctx.log.info("snapshot %s of %s", path, subvolume)
    metadata: dict[str, object] = {"snapshot": path.name}
    if not ctx.runner.dry_run:
        source = parse_subvolume_show(ctx.runner.run(make_show_command(subvolume)).stdout)
        taken = parse_subvolume_show(ctx.runner.run(make_show_command(path)).stdout)
        metadata.update(subvolume_uuid=source.uuid, snapshot_uuid=taken.uuid)
    relative = inside.relative_to(subvolume) if inside is not None else Path()
    return Snapshot(path / relative, path, entry, metadata)


# gfs's snapshot directory is made keeping its parent's times (`make_quiet_dir`): the
# first snapshot of a subvolume would otherwise carry gfs's own mkdir as the time of the
# backed-up directory (the subvolume's root, for a files job of the whole subvolume).


def retire(ctx: JobContext, snapshot: Snapshot, keep: int) -> None:
    """Delete the snapshot, or keep it and delete gfs's own older ones beyond `keep`."""
    if keep <= 0:
        delete_snapshot(ctx, snapshot.subvolume)
        ctx.state.done(snapshot.journal_id)
        return
    ctx.state.done(snapshot.journal_id)  # kept on purpose: a local snapshot, not a backup
    for old in _own_snapshots(ctx, snapshot.subvolume.parent)[:-keep]:
        delete_snapshot(ctx, old)


def undo(ctx: JobContext, entry: JournalEntry) -> None:
    """Remove a snapshot an interrupted run journaled, if it exists and is gfs's."""
    path = Path(entry.path)
    if source_host(ctx).exists(path) and is_own_snapshot(path, ctx.job.name):
        delete_snapshot(ctx, path)
    ctx.state.done(entry.id)


def delete_snapshot(ctx: JobContext, path: Path) -> None:
    if not is_own_snapshot(path, ctx.job.name):  # never anything gfs did not name
        raise ValueError(f"refusing to delete {path}: not a gfs snapshot of {ctx.job.name}")
    ctx.runner.run(make_delete_command(path))
    ctx.log.info("deleted snapshot %s", path)


def local_snapshots(ctx: JobContext, subvolume: Path) -> list[Path]:
    """gfs's own snapshots of this job that exist now (not backups)."""
    return _own_snapshots(ctx, snapshot_dir(ctx, subvolume))


def _own_snapshots(ctx: JobContext, folder: Path) -> list[Path]:
    """Snapshots in `folder` that carry gfs's name for this job *and* are in its journal."""
    ours = ctx.state.snapshot_paths(ctx.job.name)
    return sorted(
        folder / name
        for name in source_host(ctx).names(folder)
        if str(folder / name) in ours and is_own_snapshot(folder / name, ctx.job.name)
    )


class SnapshottingBackend:
    """What the btrfs-snapshotting kinds share: the source path key and snapshot upkeep."""

    source_key = ""
    source_what = ""  # what the source is, in messages

    def sources(self, job: Job) -> list[Path]:
        return [Path(job.options[self.source_key])]

    def source_path(self, ctx: JobContext) -> Path:
        """The job's source; SourceError when it does not exist."""
        path = Path(ctx.job.options[self.source_key])
        if not source_host(ctx).exists(path):
            raise SourceError(
                f"job {ctx.job.name}: source {self.source_what} {path} does not exist"
            )
        return path

    def retire_snapshot(self, ctx: JobContext, snapshot: Snapshot, keep: int) -> None:
        retire(ctx, snapshot, keep)

    def undo_entry(self, ctx: JobContext, entry: JournalEntry) -> None:
        undo(ctx, entry)

    def health(self, job: Job) -> list[str]:
        return []  # left snapshots are reported from the journal (actions/status.py)
