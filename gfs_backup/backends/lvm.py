"""LVM logical volumes: a gfs-named snapshot (classic with a computed size, or thin), read
as a raw stream by the job's host and written sparse, checksummed, on the target; the
snapshot is removed right after. Every command goes through the job's runner, so the
volume group may live on a remote host (SSH). When that host also mounts the target, the
copy is one pipeline there (hostcopy.py): the image never passes through this machine."""

from __future__ import annotations

import io
import time
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, cast

from gfs_backup.backends.base import (
    Exported,
    JobContext,
    Progress,
    RestoreOptions,
    Snapshot,
    SourceError,
    snapshot_name,
)
from gfs_backup.backends.lvm_thin import LAYOUT, ThinDelta, capture_on_host
from gfs_backup.backends.vm_capture import (
    VERIFY_SCOPE,
    Decision,
    DiskCapture,
    capture_record,
    capture_source,
    data_files,
    files_of,
)
from gfs_backup.copying.copy import copy_file, copy_stream, digest_file
from gfs_backup.copying.hostcopy import (
    CopyOutput,
    make_device_copy_command,
    make_kill_group_command,
)
from gfs_backup.core.config import Job
from gfs_backup.core.errors import GfsError
from gfs_backup.core.lvmnames import LvmInputError, parse_size, split_volume
from gfs_backup.core.state import JournalEntry
from gfs_backup.target.catalog import Stored
from gfs_backup.target.fs import (
    LOCAL_FS,
    WHOLE_FILE_SHA256,
    TargetStalled,
    fetch_file,
)
from gfs_backup.target.manifest import DataFile
from gfs_backup.tools.lvm import (
    Volume,
    make_lvs_command,
    make_read_command,
    make_remove_command,
    make_snapshot_command,
    parse_lvs,
)
from gfs_backup.transport.runner import Command, CommandError, LocalRunner, Runner
from gfs_backup.transport.ssh import IdleTimeout

IMAGE = "volume.raw"
QCOW2_IMAGE = "volume.qcow2"
DEFAULT_SNAPSHOT_SIZE = "20%"
EXPORT_TIMEOUT = 24 * 3600.0


class SnapshotInvalid(GfsError):
    """A classic snapshot overflowed while gfs read it: the copy is not a point in time."""


def _volume(runner: Runner, vg: str, lv: str) -> Volume | None:
    done = runner.run(make_lvs_command(vg, lv), check=False)
    if done.returncode != 0:
        return None
    found = parse_lvs(done.stdout)
    return found[0] if found else None


class LvmBackend:
    kind = "lvm"

    def __init__(self) -> None:
        # Thin snapshots exported this run, kept as delta bases: the base each replaces.
        self._kept: dict[str, str | None] = {}

    def sources(self, job: Job) -> list[Path]:
        return []  # a block device: no filesystem the target could share

    def check_source(self, ctx: JobContext) -> None:
        vg, lv = self._names(ctx.job)
        volume = _volume(ctx.runner, vg, lv)
        if volume is None:
            raise SourceError(
                f"job {ctx.job.name}: logical volume {vg}/{lv} does not exist on host "
                f"{ctx.runner.host} (lvs shows the volumes)"
            )
        if volume.origin:
            raise SourceError(f"job {ctx.job.name}: {vg}/{lv} is itself a snapshot")

    def _names(self, job: Job) -> tuple[str, str]:
        try:
            return split_volume(str(job.options["volume"]))
        except LvmInputError as exc:  # config validation refuses these already
            raise SourceError(f"job {job.name}: volume {exc}") from None

    def snapshot(self, ctx: JobContext) -> Snapshot:
        vg, lv = self._names(ctx.job)
        origin = _volume(ctx.runner, vg, lv)
        if origin is None:
            raise SourceError(f"job {ctx.job.name}: {vg}/{lv} vanished")
        name = snapshot_name(ctx.job.name, ctx.now, ctx.run_id)
        size = None
        if not origin.is_thin:
            text = str(ctx.job.options.get("snapshot_size", DEFAULT_SNAPSHOT_SIZE))
            size = parse_size(text, origin.size)
        entry = ctx.state.journal(ctx.run_id, ctx.job.name, "snapshot", f"{vg}/{name}")
        done = ctx.runner.run(make_snapshot_command(vg, lv, name, size), check=False)
        if done.returncode != 0:
            why = " ".join(done.stderr.split())[-300:]
            hint = ""
            if "insufficient free space" in why.lower():
                hint = (
                    f"; volume group {vg} has too little free space for a {size} byte "
                    "snapshot: free some or lower snapshot_size"
                )
            raise SourceError(f"job {ctx.job.name}: snapshot of {vg}/{lv} failed: {why}{hint}")
        ctx.log.info(
            "job %s: snapshot %s/%s of %s/%s (%s)",
            ctx.job.name,
            vg,
            name,
            vg,
            lv,
            "thin" if size is None else f"{size} bytes copy-on-write",
        )
        metadata = {"volume": f"{vg}/{lv}", "snapshot": name, "size": origin.size}
        metadata["snapshot_kind"] = "thin" if size is None else "classic"
        return Snapshot(Path(f"/dev/{vg}/{name}"), Path(f"{vg}/{name}"), entry, metadata)

    def export(
        self,
        ctx: JobContext,
        snapshot: Snapshot | None,
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> Exported:
        assert snapshot is not None
        vg, name = str(snapshot.subvolume).split("/")
        self._still_valid(ctx, vg, name)
        image_format = str(ctx.job.options.get("format", "raw"))
        if snapshot.metadata.get("snapshot_kind") == "thin" and image_format == "raw":
            return self._export_thin(ctx, snapshot, into, previous, progress)
        if ctx.target is not LOCAL_FS:
            return self._export_on_host(ctx, snapshot, into, progress)
        read = make_read_command(str(snapshot.path), EXPORT_TIMEOUT)
        try:
            with ctx.runner.reading(read) as stream:
                result = copy_stream(cast(BinaryIO, stream), into / IMAGE, progress)
        except CommandError:
            self._still_valid(ctx, vg, name)  # an invalid snapshot reads as EIO: say why
            raise
        self._still_valid(ctx, vg, name)  # an overflow during the read spoils the copy
        size = int(snapshot.metadata["size"])
        if result.size != size:
            raise GfsError(
                f"job {ctx.job.name}: read {result.size} bytes of {vg}/{name}, expected {size}"
            )
        image_format = str(ctx.job.options.get("format", "raw"))
        source = {**snapshot.metadata, "host": ctx.runner.host, "format": image_format}
        if image_format == "qcow2":
            return self._as_qcow2(ctx, into, result.digest, source)
        return Exported(
            files=(DataFile(IMAGE, result.size, result.digest),),
            source=source,
            bytes_written=result.data_bytes,
        )

    def _export_thin(
        self,
        ctx: JobContext,
        snapshot: Snapshot,
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> Exported:
        """A thin volume: what changed since the previous run's kept thin snapshot,
        patched into a clone of its image (see lvm_thin), here or, when the volume's host
        mounts the target, on that host; the new snapshot is kept as the next run's base."""
        vg, name = str(snapshot.subvolume).split("/")
        size = int(snapshot.metadata["size"])
        origin = _volume(ctx.runner, *self._names(ctx.job))
        thin = ThinDelta(ctx, vg, origin.pool if origin else "", name, size)
        decision, base = thin.decide(previous)
        if ctx.target is not LOCAL_FS:
            capture = capture_on_host(ctx, thin, str(snapshot.path), into, decision, base, progress)
            self._still_valid(ctx, vg, name)
            files = data_files([capture])  # the digest file was written there
        else:
            capture = self._capture_here(ctx, thin, snapshot, into, decision, base, progress)
            self._still_valid(ctx, vg, name)
            files = files_of(into, [capture])
        record = {**capture_record(ctx, decision, [capture], None), "snapshot": name}
        self._kept[str(snapshot.subvolume)] = f"{vg}/{base}" if base else None
        warnings = [capture.warning] if capture.warning else []
        warnings += [f"dirty-tracking alarm: {a}" for a in record.get("alarm", {}).values()]
        ctx.log.info(
            "job %s: %s (%s), read %d MiB, wrote %d MiB%s",
            ctx.job.name,
            capture.mode,
            capture.path,
            capture.result.bytes_read >> 20,
            capture.result.bytes_written >> 20,
            f"; {capture.reason}" if capture.reason else "",
        )
        return Exported(
            files=tuple(files),
            source={
                **snapshot.metadata,
                "host": ctx.runner.host,
                "format": "raw",
                "capture": record,
            },
            bytes_written=capture.result.bytes_written,
            warnings=tuple(warnings),
            read_back=True,
            verify_scope=VERIFY_SCOPE if capture.mode == "incremental" else "full",
        )

    def _capture_here(
        self,
        ctx: JobContext,
        thin: ThinDelta,
        snapshot: Snapshot,
        into: Path,
        decision: Decision,
        base: str | None,
        progress: Progress | None,
    ) -> DiskCapture:
        dirty: list[tuple[int, int]] | None = None
        zero: list[tuple[int, int]] = []
        if base is not None and decision.base is not None:
            try:
                changed, zero = thin.changes(base)
                dirty = changed + zero
            except (GfsError, ValueError) as exc:
                decision = Decision(None, f"thin_delta failed: {exc}")
        ctx.log.info(
            "job %s: %s",
            ctx.job.name,
            f"reading what changed since {base}"
            if dirty is not None and not decision.compare
            else f"full read: {decision.reason}",
        )
        try:
            return capture_source(
                ctx, thin.source(str(snapshot.path), dirty, zero), LAYOUT, into, decision, progress
            )
        except BaseException:
            thin.abort_readers()
            raise

    def _export_on_host(
        self, ctx: JobContext, snapshot: Snapshot, into: Path, progress: Progress | None
    ) -> Exported:
        """The target is mounted by the job's own host: copy and checksum there in one
        pipeline (whole-file sha256); only progress and the digest come back."""
        vg, name = str(snapshot.subvolume).split("/")
        image = into / IMAGE
        output = CopyOutput()
        idle = ctx.target.io_timeout
        command = make_device_copy_command(str(snapshot.path), str(image), EXPORT_TIMEOUT, idle)
        started = time.monotonic()
        try:
            with ctx.runner.reading(command) as stream:
                while chunk := cast(io.BufferedIOBase, stream).read1(1 << 16):
                    grown = output.feed(chunk)
                    if grown and progress is not None:
                        progress(grown)
        except IdleTimeout:
            self._stop_pipeline(ctx, output.pgid)
            raise TargetStalled(
                f"job {ctx.job.name}: target {ctx.job.target} ({image} on host "
                f"{ctx.runner.host}) stopped answering: no progress writing the image for "
                f"{idle:.0f} s (io_timeout; NFS server down or unreachable?): export stopped, "
                "nothing published; the next run removes the partial"
            ) from None
        except CommandError as exc:
            self._stop_pipeline(ctx, output.pgid)
            self._still_valid(ctx, vg, name)  # an invalid snapshot reads as EIO: say why
            why = "; ".join(output.failures()[-3:]) or str(exc)
            raise GfsError(
                f"job {ctx.job.name}: export of {vg}/{name} to {image} on host "
                f"{ctx.runner.host} failed: {why}"
            ) from None
        except BaseException:
            self._stop_pipeline(ctx, output.pgid)
            raise
        self._still_valid(ctx, vg, name)  # an overflow during the read spoils the copy
        result = output.result()
        size = int(snapshot.metadata["size"])
        if result is None or result.size != size:
            got = "no result" if result is None else f"{result.size} bytes"
            raise GfsError(
                f"job {ctx.job.name}: copied {got} of {vg}/{name} to {image} on host "
                f"{ctx.runner.host}, expected {size} bytes (short read or write)"
            )
        seconds = max(time.monotonic() - started, 1e-3)
        ctx.log.info(
            "job %s: copied %d bytes (%d allocated) on host %s in %.1f s (%.1f MiB/s)",
            ctx.job.name,
            result.size,
            result.allocated,
            ctx.runner.host,
            seconds,
            result.size / seconds / (1 << 20),
        )
        source = {**snapshot.metadata, "host": ctx.runner.host, "format": "raw"}
        return Exported(
            files=(DataFile(IMAGE, result.size, result.digest),),
            source=source,
            bytes_written=result.allocated,
            digest_algorithm=WHOLE_FILE_SHA256,
        )

    def _stop_pipeline(self, ctx: JobContext, pgid: int | None) -> None:
        """End the remote pipeline by its process group (a writer stuck on a hard NFS
        mount dies of SIGKILL when it can; gfs goes on either way)."""
        if pgid is None:
            return
        with suppress(GfsError, ValueError):
            ctx.runner.run(make_kill_group_command(pgid), check=False)

    def _as_qcow2(
        self, ctx: JobContext, into: Path, raw_digest: str, source: dict[str, object]
    ) -> Exported:
        """format = "qcow2": the raw image converted on the target, which is mounted here
        (zero clusters not written); the raw image's checksum stays in the source facts."""
        qcow2 = into / QCOW2_IMAGE
        LocalRunner(ctx.runner.dry_run).run(
            Command(
                ("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(into / IMAGE), str(qcow2)),
                mutating=True,
                timeout=EXPORT_TIMEOUT,
            )
        )
        (into / IMAGE).unlink()
        result = digest_file(qcow2)
        return Exported(
            files=(DataFile(QCOW2_IMAGE, result.size, result.digest),),
            source={**source, "raw_digest": raw_digest},
            bytes_written=result.data_bytes,
        )

    def _still_valid(self, ctx: JobContext, vg: str, name: str) -> None:
        volume = _volume(ctx.runner, vg, name)
        if volume is None or volume.is_invalid_snapshot:
            state = "is gone" if volume is None else "overflowed and is invalid"
            raise SnapshotInvalid(
                f"job {ctx.job.name}: snapshot {vg}/{name} {state}: the copy is not a "
                "point in time and is not kept; give the snapshot more room "
                "(snapshot_size) or back up when the volume is less busy"
            )

    def retire_snapshot(self, ctx: JobContext, snapshot: Snapshot, keep: int) -> None:
        """Removed (a classic snapshot slows every write to its origin), except a thin one
        whose export succeeded: the next run's delta base (see lvm_thin)."""
        if str(snapshot.subvolume) in self._kept:
            replaced = self._kept.pop(str(snapshot.subvolume))
            ctx.log.info(
                "job %s: kept thin snapshot %s: the next run reads what changed since",
                ctx.job.name,
                snapshot.subvolume,
            )
            if replaced is not None:  # the previous base pins blocks for nothing now
                self._remove(ctx, replaced)
        else:
            self._remove(ctx, str(snapshot.subvolume))
        ctx.state.done(snapshot.journal_id)

    def _remove(self, ctx: JobContext, vg_name: str) -> None:
        vg, name = vg_name.split("/")
        if not name.startswith(f"gfs-{ctx.job.name}-"):
            return  # never anything gfs did not name
        if _volume(ctx.runner, vg, name) is not None:
            ctx.runner.run(make_remove_command(vg, name))
            ctx.log.info("job %s: removed snapshot %s", ctx.job.name, vg_name)

    def undo_entry(self, ctx: JobContext, entry: JournalEntry) -> None:
        """A snapshot an interrupted run journaled (killed, connection dropped) is removed."""
        if entry.action == "snapshot":
            self._remove(ctx, entry.path)
        ctx.state.done(entry.id)

    def health(self, job: Job) -> list[str]:
        return []

    def verify_data(self, stored: Stored, progress: Progress | None) -> list[str]:
        return []  # a raw image: the checksums are the whole check

    def restore(
        self,
        ctx: JobContext,
        stored: Stored,
        to: Path,
        progress: Progress | None,
        options: RestoreOptions,
    ) -> None:
        """The raw image to the new file `to` (sparse), checked against the manifest;
        write it onto a volume with dd."""
        data = stored.manifest.files[0]
        if stored.fs is not LOCAL_FS:
            self._restore_from_host(stored, to, progress)
            return
        if data.path == QCOW2_IMAGE:
            LocalRunner().run(  # `to` is on this machine
                Command(
                    (
                        "qemu-img",
                        "convert",
                        "-f",
                        "qcow2",
                        "-O",
                        "raw",
                        str(stored.path / data.path),
                        str(to),
                    ),
                    mutating=True,
                    timeout=EXPORT_TIMEOUT,
                )
            )
            result = digest_file(to, progress)
            expected = str(stored.manifest.source.get("raw_digest", ""))
        else:
            result = copy_file(stored.path / IMAGE, to, progress)
            expected = data.digest
        if result.digest != expected:
            to.unlink(missing_ok=True)
            raise ValueError(f"{data.path}: restored image has checksum {result.digest}")

    def _restore_from_host(self, stored: Stored, to: Path, progress: Progress | None) -> None:
        """A raw image on a remote target, streamed from its host to the new file `to`
        (sparse), checked against the manifest's digest."""
        data = stored.manifest.files[0]
        algorithm = stored.manifest.digest_algorithm
        found = fetch_file(stored.fs, stored.path / data.path, algorithm, to, progress)
        if (found.size, found.digest) != (data.size, data.digest):
            to.unlink(missing_ok=True)
            raise ValueError(f"{data.path}: restored image has checksum {found.digest}")
