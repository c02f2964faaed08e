"""BTRFS subvolume jobs: a read-only snapshot exported as a full `btrfs send` stream.

On a remote host (`host = "kvm2"`) the snapshot is taken, sent and deleted there. To a
target that host mounts, the stream stays on it: `btrfs send` is written into the target
by a small program there (copying/hostimage.py STREAM_SCRIPT), its sha256-1m computed in
that pass and checked again from storage; to a target mounted here, the stream crosses
SSH. A restore receives on the job's host, from the stream on its own target or through
SSH."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
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
from gfs_backup.backends.sourcehost import source_host
from gfs_backup.copying.copy import copy_stream
from gfs_backup.copying.digest import ALGORITHM
from gfs_backup.copying.hostimage import ScriptOutput, make_stream_command
from gfs_backup.core.config import LOCAL_HOST
from gfs_backup.core.errors import GfsError
from gfs_backup.target.catalog import Stored
from gfs_backup.target.manifest import DataFile
from gfs_backup.tools.btrfs import (
    LONG,
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
        if not source_host(ctx).is_subvolume_root(path):
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
        source = {"subvolume": ctx.job.options["subvolume"], **snapshot.metadata}
        send = make_send_command(snapshot.subvolume)
        if ctx.job.host != LOCAL_HOST and ctx.target.host == ctx.job.host:
            size, digest = _send_on_host(ctx, send.argv, into / STREAM, progress)
            return Exported(
                files=(DataFile(STREAM, size, digest),),
                source={**source, "written_on": ctx.job.host},
                bytes_written=size,
                read_back=True,
            )
        with ctx.runner.reading(send) as stream:
            result = copy_stream(cast(BinaryIO, stream), into / STREAM, progress, verify=True)
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
        host = source_host(ctx)
        staging = to.parent / f".gfs-restore-{to.name}-{os.getpid()}"
        host.make_dir(staging)
        received = staging / name
        try:
            if stored.fs.host != LOCAL_HOST and stored.fs.host == host.name:
                # The stream is on a target this host mounts: received there, not sent.
                receive = make_receive_command(staging)
                argv = (*receive.argv[:-1], "-f", str(stored.path / STREAM), str(staging))
                ctx.runner.run(replace(receive, argv=argv))
            else:
                with (
                    stored.fs.open_read(stored.path / STREAM) as stream,
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
            if host.exists(received):
                ctx.runner.run(make_delete_command(received), check=False)
            host.remove_dir(staging)


def _send_on_host(
    ctx: JobContext, send_argv: tuple[str, ...], destination: Path, progress: Progress | None
) -> tuple[int, str]:
    """`btrfs send` written into the target on the job's host (the stream never crosses
    SSH); the sha256-1m computed while writing, then again from the target's storage."""
    command = make_stream_command(send_argv, str(destination), LONG, ctx.target.io_timeout)
    output = ScriptOutput()
    with ctx.runner.reading(command) as stream:
        while chunk := stream.read(1 << 12):
            grown = output.feed(chunk)
            if progress is not None and grown:
                progress(grown)
    found = (output.result() or "").split()
    if len(found) != 2 or not found[0].isdigit():
        raise GfsError(f"job {ctx.job.name}: btrfs send on host {ctx.job.host} gave no result")
    size, digest = int(found[0]), found[1]
    stored = ctx.target.file_digest(destination, ALGORITHM)
    if (stored.size, stored.digest) != (size, digest):
        raise GfsError(
            f"job {ctx.job.name}: {destination} on host {ctx.job.host} does not read back as "
            "written (sha256-1m from its storage differs)"
        )
    return size, digest
