"""Data-directory jobs: a plain file tree, hard-linked to the previous generation.

On BTRFS the directory's subvolume is snapshotted first, so the copy is point-in-time;
elsewhere the live directory is copied and the manifest says it is not point-in-time.
"""

from __future__ import annotations

from pathlib import Path

from gfs_backup.backends import snapshots
from gfs_backup.backends.base import (
    Exported,
    JobContext,
    Progress,
    RestoreOptions,
    Snapshot,
    SourceError,
)
from gfs_backup.btrfs import containing_subvolume
from gfs_backup.catalog import Stored
from gfs_backup.filetree import export_tree, restore_tree, verify_tree
from gfs_backup.mounts import mount_of, read_mounts
from gfs_backup.treeentry import TreeEntry

TREE = "data"


def tree_entries(stored: Stored) -> list[TreeEntry]:
    """The file-tree entries of a generation's manifest (ValueError if edited badly)."""
    where = f"{stored.path}/manifest.json: tree"
    return [
        TreeEntry.from_json(item, f"{where}[{index}]")
        for index, item in enumerate(stored.manifest.tree)
    ]


class FilesBackend(snapshots.SnapshottingBackend):
    kind = "files"
    source_key = "path"

    def check_source(self, ctx: JobContext) -> None:
        path = Path(ctx.job.options["path"])
        if not path.is_dir():
            raise SourceError(f"job {ctx.job.name}: source directory {path} does not exist")

    def snapshot(self, ctx: JobContext) -> Snapshot | None:
        path = Path(ctx.job.options["path"])
        if mount_of(path, read_mounts()).fstype != "btrfs":
            return None
        return snapshots.take_snapshot(ctx, containing_subvolume(path), inside=path)

    def export(
        self,
        ctx: JobContext,
        snapshot: Snapshot | None,
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> Exported:
        source = snapshot.path if snapshot is not None else Path(ctx.job.options["path"])
        linked_from = None
        if previous is not None and previous.manifest.tree:
            linked_from = (
                previous.path / TREE,
                {entry.path: entry for entry in tree_entries(previous)},
            )
        result = export_tree(source, into / TREE, linked_from, progress)
        warnings = [f"not exported: {line}" for line in result.skipped]
        if snapshot is None:
            warnings.append(
                f"{ctx.job.options['path']} is not on btrfs: copied live, not point-in-time"
            )
        metadata = {
            "path": ctx.job.options["path"],
            "copied_files": result.copied_files,
            "linked_files": result.linked_files,
        }
        if snapshot is not None:
            metadata.update(snapshot.metadata)
        return Exported(
            tree=tuple(entry.to_json() for entry in result.entries),
            source=metadata,
            point_in_time=snapshot is not None,
            bytes_written=result.copied_bytes,
            warnings=tuple(warnings),
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
