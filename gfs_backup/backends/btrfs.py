"""BTRFS subvolume jobs: a read-only snapshot exported as a full `btrfs send` stream."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, cast

from gfs_backup.backends import snapshots
from gfs_backup.backends.base import (
    Exported,
    JobContext,
    Progress,
    RestoreOptions,
    Snapshot,
    SourceError,
)
from gfs_backup.copying.copy import copy_stream
from gfs_backup.core.errors import GfsError
from gfs_backup.target.catalog import Stored
from gfs_backup.target.manifest import DataFile
from gfs_backup.tools.btrfs import (
    is_subvolume_root,
    make_delete_command,
    make_receive_command,
    make_send_command,
    make_show_command,
    make_writable_snapshot_command,
    parse_subvolume_show,
)

STREAM = "subvolume.btrfs"


class BtrfsBackend(snapshots.SnapshottingBackend):
    kind = "btrfs"
    source_key = source_what = "subvolume"

    def check_source(self, ctx: JobContext) -> None:
        path = self.source_path(ctx)
        if not is_subvolume_root(path):
            raise SourceError(
                f"job {ctx.job.name}: {path} is not a btrfs subvolume (use "
                'kind = "files" for a plain directory)'
            )

    def snapshot(self, ctx: JobContext) -> Snapshot:
        return snapshots.take_snapshot(ctx, Path(ctx.job.options["subvolume"]))

    def export(
        self,
        ctx: JobContext,
        snapshot: Snapshot | None,
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> Exported:
        assert snapshot is not None
        with ctx.runner.reading(make_send_command(snapshot.subvolume)) as stream:
            result = copy_stream(cast(BinaryIO, stream), into / STREAM, progress, verify=True)
        source = {"subvolume": ctx.job.options["subvolume"], **snapshot.metadata}
        return Exported(
            files=(DataFile(STREAM, result.size, result.digest),),
            source=source,
            bytes_written=result.data_bytes,
            read_back=True,
        )

    def verify_data(self, stored: Stored, progress: Progress | None) -> list[str]:
        return []

    def restore(
        self,
        ctx: JobContext,
        stored: Stored,
        to: Path,
        progress: Progress | None,
        options: RestoreOptions,
    ) -> None:
        """`btrfs receive` the stream, check it is the snapshot that was sent, make it
        a writable subvolume at `to`."""
        name = str(stored.manifest.source.get("snapshot", ""))
        expected = stored.manifest.source.get("snapshot_uuid")
        staging = to.parent / f".gfs-restore-{to.name}-{os.getpid()}"
        staging.mkdir(mode=0o700)
        received = staging / name
        try:
            with (
                (stored.path / STREAM).open("rb") as stream,
                ctx.runner.writing(make_receive_command(staging)) as feed,
            ):
                shutil.copyfileobj(stream, feed, 4 << 20)
            info = parse_subvolume_show(ctx.runner.run(make_show_command(received)).stdout)
            if expected and info.received_uuid != expected:
                raise GfsError(
                    f"restored subvolume {received} is not the snapshot in the "
                    f"manifest (received UUID {info.received_uuid}, expected "
                    f"{expected})"
                )
            ctx.runner.run(make_writable_snapshot_command(received, to))
        finally:
            if received.exists():
                ctx.runner.run(make_delete_command(received), check=False)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
