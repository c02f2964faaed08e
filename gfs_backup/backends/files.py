"""Data-directory jobs: a plain file tree, hard-linked to the previous verified generation.

On BTRFS the directory's subvolume is snapshotted first, so the copy is point-in-time;
elsewhere the live directory is copied and the manifest says it is not point-in-time.
What counts as unchanged, and the periodic rehash: see filetree.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from gfs_backup.backends import snapshots
from gfs_backup.backends.base import (
    Exported,
    JobContext,
    Progress,
    RestoreOptions,
    Snapshot,
    SourceError,
)
from gfs_backup.copying.filetree import Base, TreeExport, export_tree, scan_clock_ns
from gfs_backup.copying.treeentry import TreeEntry
from gfs_backup.copying.treerestore import restore_tree, verify_tree
from gfs_backup.core.errors import GfsError
from gfs_backup.target.catalog import Stored, last_verified_ok
from gfs_backup.tools.btrfs import containing_subvolume
from gfs_backup.tools.mounts import mount_of, read_mounts

TREE = "data"
SCAN_STARTED = "scan_started_ns"  # source metadata keys a later export builds on
GRANULARITY = "timestamp_granularity_ns"
FULL_READ_AT = "full_read_at"


def tree_entries(stored: Stored) -> list[TreeEntry]:
    """The file-tree entries of a generation's manifest (ValueError if edited badly)."""
    where = f"{stored.path}/manifest.json: tree"
    return [
        TreeEntry.from_json(item, f"{where}[{index}]")
        for index, item in enumerate(stored.manifest.tree)
    ]


def make_base(previous: Stored | None, now: datetime, rehash_every: int) -> Base | None:
    """What a new export may take over from `previous`: None when it has no tree, failed
    its latest verify, or lacks the scan time (older gfs); `rehash` when its last full
    read is `rehash_every` seconds old or more (0: never)."""
    if previous is None or not previous.manifest.tree or not last_verified_ok(previous):
        return None
    source = previous.manifest.source
    started, granularity = source.get(SCAN_STARTED), source.get(GRANULARITY)
    if type(started) is not int or type(granularity) is not int or granularity < 0:
        return None
    try:
        entries = {entry.path: entry for entry in tree_entries(previous)}
        full_read = datetime.fromisoformat(str(source.get(FULL_READ_AT)).replace("Z", "+00:00"))
    except ValueError:
        return None
    if full_read.tzinfo is None:
        return None
    rehash = bool(rehash_every) and (now - full_read).total_seconds() >= rehash_every
    return Base(previous.path / TREE, entries, started - granularity, rehash)


class FilesBackend(snapshots.SnapshottingBackend):
    kind = "files"
    source_key = "path"
    source_what = "directory"

    def check_source(self, ctx: JobContext) -> None:
        if not self.source_path(ctx).is_dir():
            path = ctx.job.options["path"]
            raise SourceError(f"job {ctx.job.name}: source {path} is not a directory")

    def snapshot(self, ctx: JobContext) -> Snapshot | None:
        path = Path(ctx.job.options["path"])
        if mount_of(path, read_mounts()).fstype != "btrfs":
            return None
        started = scan_clock_ns()  # before the snapshot: its files' times are older
        taken = snapshots.take_snapshot(ctx, containing_subvolume(path), inside=path)
        taken.metadata[SCAN_STARTED] = started
        return taken

    def export(
        self,
        ctx: JobContext,
        snapshot: Snapshot | None,
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> Exported:
        source = snapshot.path if snapshot is not None else Path(ctx.job.options["path"])
        base = make_base(previous, ctx.now, int(ctx.job.options.get("rehash_every", 0)))
        started = snapshot.metadata.get(SCAN_STARTED) if snapshot is not None else None
        result = export_tree(
            source,
            into / TREE,
            base,
            progress,
            scan_started_ns=started,
            exclude=_own_snapshot_dir(ctx, snapshot),
        )
        warnings = _summary("not exported", result.skipped) + _summary("", result.warnings)
        if snapshot is None:
            warnings.append(
                f"{ctx.job.options['path']} is not on btrfs: copied live, not point-in-time"
            )
        read_back = ctx.job.policy.verify_after_export
        if read_back:
            _read_back(ctx, into / TREE, result)
        if base is None:
            ctx.log.info("job %s: reading every file (%s)", ctx.job.name, _why_full(previous))
        elif base.rehash:
            ctx.log.info("job %s: periodic rehash: reading every file", ctx.job.name)
        metadata = {
            "path": ctx.job.options["path"],
            **_tree_metadata(result, ctx.now, previous, base),
        }
        if snapshot is not None:
            metadata.update(snapshot.metadata)
        return Exported(
            tree=tuple(entry.to_json() for entry in result.entries),
            source=metadata,
            point_in_time=snapshot is not None,
            bytes_written=result.copied_bytes,
            warnings=tuple(warnings),
            read_back=read_back,
        )

    def verify_data(self, stored: Stored, progress: Progress | None) -> list[str]:
        try:
            entries = tree_entries(stored)
        except ValueError as exc:
            return [str(exc)]
        return verify_tree(stored.path / TREE, entries, progress)

    def restore(
        self,
        ctx: JobContext,
        stored: Stored,
        to: Path,
        progress: Progress | None,
        options: RestoreOptions,
    ) -> None:
        restore_tree(stored.path / TREE, tree_entries(stored), to, progress)


def _read_back(ctx: JobContext, tree: Path, result: TreeExport) -> None:
    """The export's verify: every file this run wrote re-read from the target's storage,
    every other object checked by its metadata (a file linked to the verified base is its
    inode). `gfs verify` and the policy's verify schedule still re-read everything.
    GfsError if the tree does not read back as exported."""
    problems = verify_tree(tree, result.entries, content_of=result.copied)
    if problems:
        raise GfsError(
            f"job {ctx.job.name}: the export does not read back as written: "
            f"{'; '.join(problems[:3])}"
        )


def _tree_metadata(
    result: TreeExport, now: datetime, previous: Stored | None, base: Base | None
) -> dict[str, Any]:
    """The manifest's record of how the tree was taken, for the next export and humans."""
    full_read_at = now.isoformat()
    if base is not None and not base.rehash and previous is not None:
        full_read_at = previous.manifest.source[FULL_READ_AT]  # make_base checked it
    return {
        "copied_files": result.copied_files,
        "linked_files": result.linked_files,
        "rehashed_files": result.rehashed_files,
        SCAN_STARTED: result.scan_started_ns,
        GRANULARITY: result.granularity_ns,
        FULL_READ_AT: full_read_at,
        "skipped": list(result.skipped),
        "changed_behind_metadata": list(result.changed_behind_metadata),
        "changed_during_backup": sum(1 for entry in result.entries if entry.changed),
    }


def _own_snapshot_dir(ctx: JobContext, snapshot: Snapshot | None) -> frozenset[str]:
    """gfs's snapshot directory, relative to the exported path when it lies inside it."""
    if snapshot is None:
        return frozenset()
    path = Path(ctx.job.options["path"])
    folder = snapshot.subvolume.parent
    try:
        return frozenset({str(folder.relative_to(path))})
    except ValueError:
        return frozenset()


def _summary(what: str, lines: list[str], most: int = 10) -> list[str]:
    """Up to `most` lines, then one line for the rest (the manifest lists them all)."""
    shown = [f"{what}: {line}" if what else line for line in lines[:most]]
    if len(lines) > most:
        shown.append(f"... and {len(lines) - most} more (listed in the manifest)")
    return shown


def _why_full(previous: Stored | None) -> str:
    if previous is None:
        return "no verified generation to build on"
    if not previous.manifest.tree:
        return f"generation {previous.id} holds no file tree"
    return f"generation {previous.id} was made by an older gfs (no scan time recorded)"
