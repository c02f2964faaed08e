"""libvirt domains: a running domain through libvirt's push-mode backup API, a shut-off one
by copying its disks with `qemu-img convert`; one qcow2 per disk, the domain XML in the
manifest."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gfs_backup.backends.base import (
    Exported,
    JobContext,
    Progress,
    RestoreOptions,
    Snapshot,
    SourceError,
)
from gfs_backup.backends.sourcehost import source_host
from gfs_backup.backends.vm_capture import (
    VERIFY_SCOPE,
    Decision,
    DiskCapture,
    NbdDir,
    capture_disk,
    capture_record,
    checkpoint_name,
    decide,
    files_of,
    generation_of,
    is_job_checkpoint,
)
from gfs_backup.backends.vm_inplace import (
    BOOT,
    DISKS,
    NVRAM,
    InPlaceRestore,
    boot_file,
    disk_files,
    disks_of,
    image_format,
    is_restore_temp,
    nvram_file,
    plan_writes,
)
from gfs_backup.backends.vm_inplace import (
    JOURNAL_ACTION as RESTORE_TEMP,
)
from gfs_backup.copying.copy import copy_file, digest_and_punch_zeros, digest_file
from gfs_backup.copying.digest import ALGORITHM
from gfs_backup.copying.hostimage import (
    HostCopy,
    ScriptOutput,
    make_copy_command,
    parse_copies,
)
from gfs_backup.copying.image import clone_file
from gfs_backup.core.config import LOCAL_HOST, Job
from gfs_backup.core.errors import GfsError
from gfs_backup.core.faults import crash_point
from gfs_backup.core.state import JournalEntry
from gfs_backup.target.catalog import Stored
from gfs_backup.target.fs import RemoteFS, TargetFS
from gfs_backup.target.manifest import DataFile
from gfs_backup.tools import nbd
from gfs_backup.tools.domainxml import (
    Disk,
    RestoredDomain,
    backup_xml,
    checkpoint_xml,
    is_gfs_overlay,
    nvram_path,
    overlay_path,
    parse_disks,
    pull_backup_xml,
    restore_xml,
    skipped_disks,
    snapshot_xml,
)
from gfs_backup.tools.virt import (
    DEFAULT_URI,
    BackupUnsupported,
    CheckpointUnusable,
    Connection,
    ConnectionLost,
)
from gfs_backup.transport.runner import Command, CommandError, LocalRunner, Runner
from gfs_backup.transport.ssh import SSHRunner
from gfs_backup.transport.virttunnel import tunnel_for

BACKUP_TIMEOUT = 24 * 3600.0
AGENT_TIMEOUT = 10  # seconds the guest agent may take to answer, to freeze
THAW_DEADLINE = 30.0  # seconds gfs keeps asking a stuck agent to thaw (see below)
COMMIT_TIMEOUT = 6 * 3600.0
LOCAL_SOURCES = ("file", "block")
METHODS = ("auto", "backup-api", "snapshot")


def make_convert_command(
    source: Path, source_format: str, destination: Path, share: bool = False, rate: int = 0
) -> Command:
    """qemu-img convert to qcow2; zero clusters are not written (sparse). `share` (-U) reads
    an image a running QEMU holds open read-only (the frozen base below a gfs overlay);
    `rate` (-r) caps the copy at that many bytes per second (0 = no limit)."""
    shared = ("-U",) if share else ()
    limit = ("-r", str(rate)) if rate else ()
    return Command(
        (
            "qemu-img",
            "convert",
            *shared,
            *limit,
            "-f",
            source_format,
            "-O",
            "qcow2",
            str(source),
            str(destination),
        ),
        mutating=True,
        timeout=BACKUP_TIMEOUT,
    )


def make_check_command(image: Path) -> Command:
    return Command(("qemu-img", "check", "-f", "qcow2", str(image)))


def find_domain(connection: Connection, job: Job) -> Any:
    """The job's domain: by UUID for a domain of a pattern job (renamed meanwhile or not),
    else by name."""
    uuid = job.options.get("uuid")
    if uuid:
        return connection.domain_by_uuid(str(uuid), str(job.options["domain"]))
    return connection.domain(str(job.options["domain"]))


def _nothing_to_back_up(job: Job, domain: str, left_out: list[tuple[str, str]]) -> SourceError:
    why = f" ({', '.join(f'{t}: {reason}' for t, reason in left_out)})" if left_out else ""
    return SourceError(f"job {job.title}: domain {domain} has no disk to back up{why}")


def left_out_disks(job: Job, domain_xml: str) -> list[tuple[str, str]]:
    """(target, why) of the domain's disks this job does not back up: cdroms, floppies,
    lun, shareable and network disks (unless named in `disks`), and `exclude_disks`."""
    named = set(job.options.get("disks") or ())
    left = [(target, why) for target, why in skipped_disks(domain_xml) if target not in named]
    patterns = list(job.options.get("exclude_disks", []))
    for disk in parse_disks(domain_xml):
        if patterns and any(fnmatch.fnmatchcase(disk.target, p) for p in patterns):
            left.append((disk.target, "excluded by the job's exclude_disks"))
    return left


def selected_disks(job: Job, disks: list[Disk], domain_xml: str | None = None) -> list[Disk]:
    """The job's `disks` (all when not set) less those `left_out_disks` names (given the
    domain's XML). Raises SourceError for unknown names."""
    wanted = job.options.get("disks")
    if not wanted:
        if domain_xml is None:
            return disks
        left = {target for target, _why in left_out_disks(job, domain_xml)}
        return [disk for disk in disks if disk.target not in left]
    by_target = {disk.target: disk for disk in disks}
    unknown = [name for name in wanted if name not in by_target]
    if unknown:
        raise SourceError(
            f"job {job.title}: domain {job.options['domain']} has no disk "
            f"{', '.join(unknown)} (disks: {', '.join(by_target)})"
        )
    return [by_target[name] for name in wanted]


class LibvirtBackend:
    kind = "libvirt"

    def _connect(self, job: Job, runner: Runner | None = None) -> Connection:
        return connect(job, runner)

    def sources(self, job: Job) -> list[Path]:
        if job.host != LOCAL_HOST:
            return []  # the disks are paths on that host: its target is checked there
        try:
            connection = self._connect(job)
        except GfsError:
            return []
        try:
            domain = find_domain(connection, job)
            xml = connection.xml(domain)
            return [Path(disk.source) for disk in selected_disks(job, parse_disks(xml), xml)]
        except GfsError:
            return []
        finally:
            connection.close()

    def check_source(self, ctx: JobContext) -> None:
        connection = self._connect(ctx.job, ctx.runner)
        try:
            domain = find_domain(connection, ctx.job)
            xml = connection.xml(domain)
            if ctx.job.options.get("renamed_from"):
                ctx.log.info(
                    "job %s: domain %s was called %s: its history goes on",
                    ctx.job.title,
                    domain.name(),
                    ctx.job.options["renamed_from"],
                )
            chosen = selected_disks(ctx.job, parse_disks(xml), xml)
            if not chosen:  # before anything is written to the target
                raise _nothing_to_back_up(ctx.job, domain.name(), left_out_disks(ctx.job, xml))
            for disk in chosen:
                if disk.source_type not in LOCAL_SOURCES or not disk.source:
                    raise SourceError(
                        f"job {ctx.job.title}: disk {disk.target} is a "
                        f"{disk.source_type} disk ({disk.source or 'no path'}): "
                        "gfs backs up file and block device disks only"
                    )
                if ctx.job.host == LOCAL_HOST:
                    _check_disk_path(ctx.job.title, disk)
        finally:
            connection.close()

    def snapshot(self, ctx: JobContext) -> Snapshot | None:
        return None  # the backup API (or a shut-off domain) gives the point in time

    def export(
        self,
        ctx: JobContext,
        snapshot: Snapshot | None,
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> Exported:
        connection = self._connect(ctx.job, ctx.runner)
        try:
            domain = find_domain(connection, ctx.job)
            live_xml = connection.xml(domain)
            disks = selected_disks(ctx.job, parse_disks(live_xml), live_xml)
            left_out = left_out_disks(ctx.job, live_xml)
            if not disks:
                raise _nothing_to_back_up(ctx.job, domain.name(), left_out)
            for target, why in left_out:
                ctx.log.info("job %s: disk %s left out: %s", ctx.job.title, target, why)
            folder = into / DISKS
            ctx.target.make_dir(folder, 0o755)
            running = connection.is_running(domain)
            method = str(ctx.job.options.get("method", "auto"))
            remote = ctx.job.host != LOCAL_HOST  # QEMU there writes into that host's target
            pull = method in ("auto", "backup-api") and nbd.available() and not remote
            if method == "auto" and not pull and not remote:
                ctx.log.info(
                    "job %s: python3-libnbd is not installed: QEMU writes whole qcow2 "
                    "images (push mode), no changed-block capture",
                    ctx.job.title,
                )
            if running and method == "backup-api" and ctx.bandwidth and not pull:
                raise GfsError(
                    f"job {ctx.job.title}: target {ctx.job.target} has a bandwidth limit and "
                    "without python3-libnbd the backup API cannot be rate limited: install "
                    'it, or use method = "auto" (then the snapshot method)'
                )
            if running and method == "auto" and ctx.bandwidth and not pull:
                ctx.log.info(
                    "job %s: the push-mode backup API cannot be rate limited: using the "
                    "snapshot method for the bandwidth limit of target %s",
                    ctx.job.title,
                    ctx.job.target,
                )
                method = "snapshot"
            facts: dict[str, Any] | None = None
            files: list[DataFile] | None = None
            warnings: list[str] = []
            if running and pull:
                facts, files, warnings = self._backup_pull(
                    ctx, connection, domain, disks, into, previous, progress
                )
            elif running and method != "snapshot":
                try:
                    facts = self._backup_running(ctx, connection, domain, disks, folder, progress)
                except BackupUnsupported as exc:
                    if method in ("backup-api", "push"):
                        raise
                    ctx.log.info("job %s: %s; using the snapshot method", ctx.job.title, exc)
            if running and facts is None:
                facts = self._backup_by_snapshot(ctx, connection, domain, disks, folder)
            if not running and pull:
                facts, files = self._read_shut_off(ctx, connection, domain, disks, into, progress)
            elif not running:
                self._copy_shut_off(ctx, connection, domain, disks, folder)
                facts = {"consistency": "offline"}
            assert facts is not None
            source = {
                "domain": domain.name(),
                "uuid": domain.UUIDString(),
                "uri": str(ctx.job.options.get("uri", DEFAULT_URI)),
                "xml": connection.xml(domain, inactive=True),
                "disks": [
                    {
                        "target": d.target,
                        "source": d.source,
                        "format": d.format,
                        "type": d.source_type,
                    }
                    for d in disks
                ],
                "state": "running" if running else "shut off",
                "method": facts.pop("method", "backup-api" if running else "qemu-img"),
                **facts,
            }
            if left_out:
                source["skipped_disks"] = [{"target": t, "why": why} for t, why in left_out]
            if ctx.job.options.get("renamed_from"):
                source["renamed_from"] = ctx.job.options["renamed_from"]
            if ctx.job.options.get("transient"):
                source["transient"] = True
        finally:
            connection.close()
        if files is None:
            files = self._checked_qcow2_files(ctx, disks, folder)
        if ctx.job.host != LOCAL_HOST:
            source["host"] = ctx.job.host
            files += _copy_host_files(ctx, str(source["xml"]), into)
        else:
            files += _export_nvram(ctx, str(source["xml"]), into)
            files += _export_boot_files(ctx, str(source["xml"]), into, previous)
        written = sum(f.size for f in files)
        capture = source.get("capture")
        if isinstance(capture, dict):
            written = int(capture.get("bytes_written", written))
        incremental = isinstance(capture, dict) and capture.get("mode") == "incremental"
        return Exported(
            files=tuple(files),
            source=source,
            bytes_written=written,
            warnings=tuple(warnings),
            # on a host, every file's checksum was read from the target's storage there and
            # its images checked by qemu-img: what the verify after the export would redo
            read_back=isinstance(capture, dict) or ctx.job.host != LOCAL_HOST,
            verify_scope=VERIFY_SCOPE if incremental else "full",
        )

    def _checked_qcow2_files(
        self, ctx: JobContext, disks: list[Disk], folder: Path
    ) -> list[DataFile]:
        """The qcow2 images QEMU or qemu-img wrote (push mode, snapshot method): checked by
        `qemu-img check`, zero blocks deallocated, checksummed."""
        files = []
        for disk in disks:
            image = folder / f"{disk.target}.qcow2"
            problems = qemu_img_problems(ctx.runner, image)
            if problems:
                raise GfsError(
                    f"job {ctx.job.title}: exported disk {disk.target} is not a "
                    f"sound qcow2: {problems}"
                )
            if ctx.job.host != LOCAL_HOST:  # checksummed on the host, read from its target
                found = ctx.target.file_digest(image, ALGORITHM)
                files.append(DataFile(f"{DISKS}/{image.name}", found.size, found.digest))
                continue
            # QEMU's backup job writes the zeros of a raw block device as data: deallocate them.
            result = digest_and_punch_zeros(image)
            files.append(DataFile(f"{DISKS}/{image.name}", result.size, result.digest))
        return files

    def _backup_pull(
        self,
        ctx: JobContext,
        connection: Connection,
        domain: Any,
        disks: list[Disk],
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> tuple[dict[str, Any], list[DataFile], list[str]]:
        """Pull-mode backup: libvirt exports the disks frozen at one instant over NBD and
        creates this generation's checkpoint; gfs reads what changed since the base's
        checkpoint (or everything) and writes complete raw images (see vm_capture)."""
        name = domain.name()
        job = ctx.job.name
        family = ctx.job.family  # checkpoints belong to the domain: named by the job
        all_disks = parse_disks(connection.xml(domain))
        existing = connection.checkpoints(domain)
        decision = decide(ctx, disks, previous, domain.UUIDString(), existing)
        for stale in existing:
            if is_job_checkpoint(stale, family) and stale != decision.incremental:
                connection.delete_checkpoint(domain, stale)
                ctx.log.info("job %s: %s: deleted checkpoint %s", job, name, stale)
        bitmapped = [disk for disk in disks if disk.format == "qcow2"]
        new = checkpoint_name(family, generation_of(into)) if bitmapped else None
        new_xml = checkpoint_xml(new, bitmapped, all_disks) if new else None
        work = NbdDir(Path(str(ctx.job.options.get("scratch_dir", "/var/tmp"))))
        entry = ctx.state.journal(ctx.run_id, job, "backup-job", name, str(work.path))
        marked = ctx.state.journal(ctx.run_id, job, "checkpoint", name, new) if new else None
        ctx.log.info(
            "job %s: backup of running domain %s (%s), %s",
            job,
            name,
            ", ".join(d.target for d in disks),
            f"changes since {decision.base.id}"
            if decision.base is not None and not decision.compare
            else f"full read: {decision.reason}",
        )
        captures: list[DiskCapture] = []
        try:
            try:
                with self._quiesced(ctx, connection, domain) as facts:
                    try:
                        connection.begin_backup(
                            domain,
                            pull_backup_xml(
                                disks, all_disks, work.socket, work.path, decision.incremental
                            ),
                            new_xml,
                        )
                    except CheckpointUnusable as exc:
                        decision = Decision(
                            None, f"libvirt cannot use the base's checkpoint: {exc}"
                        )
                        ctx.log.warning("job %s: %s; reading everything", job, decision.reason)
                        connection.begin_backup(
                            domain,
                            pull_backup_xml(disks, all_disks, work.socket, work.path, None),
                            new_xml,
                        )
                crash_point("mid-export")
                try:
                    for disk in disks:
                        contexts: tuple[str, ...] = (nbd.ALLOCATION,)
                        if decision.incremental:
                            contexts += (nbd.dirty_context(disk.target),)
                        export = nbd.NbdExport.unix(work.socket, disk.target, contexts)
                        try:
                            captures.append(
                                capture_disk(ctx, export, disk, into, decision, progress)
                            )
                        finally:
                            export.close()
                except (GfsError, OSError):
                    if not connection.is_running(domain):
                        raise GfsError(
                            f"domain {name} stopped during its backup: no generation was "
                            "made; the next run backs it up (running or shut off)"
                        ) from None
                    raise
            finally:
                self._end_backup_job(ctx, connection, domain, entry)
                work.remove()
        except BaseException:
            if new is not None and marked is not None:
                self._drop_checkpoint(ctx, connection, domain, new, marked)
            raise
        if marked is not None:
            ctx.state.done(marked)
        return self._captured(ctx, decision, captures, new, into, {**facts, "method": "pull"})

    def _captured(
        self,
        ctx: JobContext,
        decision: Decision,
        captures: list[DiskCapture],
        checkpoint: str | None,
        into: Path,
        facts: dict[str, Any],
    ) -> tuple[dict[str, Any], list[DataFile], list[str]]:
        """Files, facts (with `capture`) and warnings of a capture; logs what it did."""
        record = capture_record(ctx, decision, captures, checkpoint)
        warnings = [c.warning for c in captures if c.warning]
        for target, alarm in record.get("alarm", {}).items():
            warnings.append(f"dirty-tracking alarm on disk {target}: {alarm}")
        for capture in captures:
            ctx.log.info(
                "job %s: disk %s: %s (%s), read %d MiB, wrote %d MiB%s",
                ctx.job.title,
                capture.target,
                capture.mode,
                capture.path,
                capture.result.bytes_read >> 20,
                capture.result.bytes_written >> 20,
                f"; {capture.reason}" if capture.reason else "",
            )
        files = files_of(into, captures)
        return {**facts, "capture": record}, files, warnings

    def _drop_checkpoint(
        self, ctx: JobContext, connection: Connection, domain: Any, name: str, entry: int
    ) -> None:
        """A failed run's new checkpoint goes (its bitmap slows every guest write); when
        libvirt cannot now, the entry stays open for the next run. Never raises."""
        try:
            if connection.is_running(domain):
                connection.delete_checkpoint(domain, name)
            ctx.state.done(entry)
        except GfsError as exc:
            ctx.log.warning("job %s: %s; the next run deletes it", ctx.job.title, exc)

    def _read_shut_off(
        self,
        ctx: JobContext,
        connection: Connection,
        domain: Any,
        disks: list[Disk],
        into: Path,
        progress: Progress | None,
    ) -> tuple[dict[str, Any], list[DataFile]]:
        """A shut-off domain's disks, read whole through a read-only qemu-nbd each (libvirt 9
        can neither create nor delete checkpoints of a shut-off domain: the next running
        backup reads everything too)."""
        name = domain.name()
        ctx.log.info("job %s: domain %s is shut off: reading its disks", ctx.job.title, name)
        decision = Decision(
            None, "the domain is shut off: libvirt makes no checkpoint of a shut-off domain"
        )
        captures = []
        for disk in disks:
            export = nbd.NbdExport.image(Path(disk.source), disk.format)
            try:
                captures.append(capture_disk(ctx, export, disk, into, decision, progress))
            finally:
                export.close()
            if connection.is_running(domain):
                raise GfsError(
                    f"job {ctx.job.title}: domain {name} was started while its "
                    "disks were read: the copy is not consistent; run again"
                )
        offline = {"consistency": "offline", "method": "qemu-nbd"}
        facts, files, _ = self._captured(ctx, decision, captures, None, into, offline)
        return facts, files

    def _backup_running(
        self,
        ctx: JobContext,
        connection: Connection,
        domain: Any,
        disks: list[Disk],
        folder: Path,
        progress: Progress | None,
    ) -> dict[str, Any]:
        """Push-mode backup, with the guest frozen around its start when the agent answers
        (or must). Returns the consistency facts for the manifest."""
        name = domain.name()
        entry = ctx.state.journal(ctx.run_id, ctx.job.name, "backup-job", name)
        ctx.log.info(
            "job %s: backup of running domain %s (%s)",
            ctx.job.title,
            name,
            ", ".join(d.target for d in disks),
        )
        try:
            with self._quiesced(ctx, connection, domain) as facts:
                connection.begin_backup(domain, backup_xml(disks, folder))
            crash_point("mid-export")
            connection.wait_backup(domain, progress, BACKUP_TIMEOUT)
        finally:
            self._end_backup_job(ctx, connection, domain, entry)
        return facts

    def _end_backup_job(
        self, ctx: JobContext, connection: Connection, domain: Any, entry: int
    ) -> None:
        """Abort the backup job if one is left, then close its journal entry. When libvirt
        cannot tell (libvirtd went away) the entry stays open and the next run's reconcile
        aborts a job that is left. Never raises: it runs while another error may be on its
        way out."""
        try:
            if connection.backup_job_after_restart(domain, f"job {ctx.job.title}"):
                connection.abort_job(domain)
        except GfsError as exc:
            ctx.log.warning("job %s: %s; the next run aborts a job left behind", ctx.job.title, exc)
            return
        ctx.state.done(entry)

    def _backup_by_snapshot(
        self,
        ctx: JobContext,
        connection: Connection,
        domain: Any,
        disks: list[Disk],
        folder: Path,
    ) -> dict[str, Any]:
        """The fallback without the backup API: a disk-only external snapshot puts the guest
        on temporary overlays, the frozen disks below are copied, then an active block
        commit merges the overlays back and pivots the domain onto its disks again. The
        overlays are journaled before they exist; whatever happens, the next run commits a
        leftover one back (see undo_entry)."""
        name = domain.name()
        layers = self._layers(ctx, disks)
        entry = ctx.state.journal(ctx.run_id, ctx.job.name, "overlay", name, json.dumps(layers))
        overlays = {target: Path(layer["overlay"]) for target, layer in layers.items()}
        xml = snapshot_xml(
            f"gfs-{ctx.job.family}-r{ctx.run_id}", parse_disks(connection.xml(domain)), overlays
        )
        ctx.log.info(
            "job %s: backup of running domain %s by snapshot (%s)",
            ctx.job.title,
            name,
            ", ".join(d.target for d in disks),
        )
        try:
            with self._quiesced(ctx, connection, domain) as facts:
                connection.create_overlays(domain, xml)
            crash_point("after-overlay")
            for disk in disks:
                ctx.runner.run(
                    make_convert_command(
                        Path(disk.source),
                        disk.format,
                        folder / f"{disk.target}.qcow2",
                        share=True,
                        rate=ctx.bandwidth,
                    )
                )
        finally:
            self._commit_layers(ctx, connection, domain, layers)
        ctx.state.done(entry)
        return {**facts, "method": "snapshot"}

    def _layers(self, ctx: JobContext, disks: list[Disk]) -> dict[str, dict[str, str]]:
        """Per disk: the disk (path, format, type) and the overlay gfs will put on it."""
        option = ctx.job.options.get("overlay_dir")
        overlay_dir = Path(option) if option else None
        layers = {}
        for disk in disks:
            if disk.source_type != "file" and overlay_dir is None:
                raise SourceError(
                    f"job {ctx.job.title}: disk {disk.target} is a block device: the "
                    "snapshot method needs overlay_dir (a directory for temporary overlays)"
                    + (" (it is used for the target's bandwidth limit)" if ctx.bandwidth else "")
                )
            overlay = overlay_path(disk.source, overlay_dir, ctx.job.family, ctx.run_id)
            layers[disk.target] = {
                "base": disk.source,
                "format": disk.format,
                "type": disk.source_type,
                "overlay": str(overlay),
            }
        return layers

    def _commit_layers(
        self,
        ctx: JobContext,
        connection: Connection,
        domain: Any,
        layers: dict[str, dict[str, str]],
    ) -> None:
        """Put the domain back on its own disks: commit each gfs overlay it runs on (or, shut
        off, is defined on) into the disk below, fix the definition, delete the overlay."""
        name = domain.name()
        for target, layer in layers.items():
            overlay = layer["overlay"]
            if connection.is_running(domain):
                if connection.disk_source(domain, target) == overlay:
                    connection.start_commit(domain, target, 0)  # local: not the target's bandwidth
                    crash_point("mid-commit")
                    connection.pivot_when_ready(domain, target, overlay, COMMIT_TIMEOUT)
                    ctx.log.info(
                        "job %s: %s: %s is on its own disk again", ctx.job.title, name, target
                    )
            elif connection.disk_source(domain, target, inactive=True) == overlay:
                self._commit_offline(ctx, Path(overlay))
            base = Disk(target, layer["base"], layer["format"], layer["type"])
            if connection.redefine_disks(domain, {target: base}):
                ctx.log.info(
                    "job %s: %s: definition of %s points at %s again",
                    ctx.job.title,
                    name,
                    target,
                    base.source,
                )
            Path(overlay).unlink(missing_ok=True)

    def _commit_offline(self, ctx: JobContext, overlay: Path) -> None:
        """qemu-img commit: the writes in a gfs overlay go into the image below it."""
        if overlay.exists():
            ctx.runner.run(
                Command(
                    ("qemu-img", "commit", "-f", "qcow2", str(overlay)),
                    mutating=True,
                    timeout=COMMIT_TIMEOUT,
                )
            )
            ctx.log.info("job %s: committed %s into the disk below it", ctx.job.title, overlay)

    @contextlib.contextmanager
    def _quiesced(
        self, ctx: JobContext, connection: Connection, domain: Any
    ) -> Iterator[dict[str, Any]]:
        """Freeze the guest's filesystems around the body when its agent answers (or must,
        quiesce = "required"), and always thaw. Yields the consistency facts, completed
        (frozen_seconds) when the body is done. A freeze that fails or times out is thawed;
        with quiesce = "auto" the backup goes on crash-consistent."""
        name = domain.name()
        mode = str(ctx.job.options.get("quiesce", "auto"))
        frozen = mode != "off" and connection.agent_answers(domain, AGENT_TIMEOUT)
        if mode == "required" and not frozen:
            raise GfsError(
                f'job {ctx.job.title}: quiesce = "required" but the guest agent of '
                f"{name} does not answer (install and start qemu-guest-agent, add "
                "the org.qemu.guest_agent.0 channel)"
            )
        facts: dict[str, Any] = {"consistency": "crash-consistent", "frozen_seconds": 0.0}
        started = time.monotonic()
        if frozen:
            try:
                connection.freeze(domain, AGENT_TIMEOUT)
            except GfsError as exc:
                self._thaw_after_failed_freeze(ctx, connection, domain)
                if mode == "required":
                    raise
                ctx.log.warning("job %s: %s; backing up crash-consistent", ctx.job.title, exc)
                facts["quiesce_failed"] = str(exc)
                frozen = False
            else:
                facts["consistency"] = "application-consistent"
                ctx.log.info("job %s: %s: guest frozen", ctx.job.title, name)
        try:
            yield facts
        finally:
            if frozen:
                connection.thaw(domain)
                facts["frozen_seconds"] = round(time.monotonic() - started, 3)

    def _thaw_after_failed_freeze(
        self, ctx: JobContext, connection: Connection, domain: Any
    ) -> None:
        """A freeze that timed out is still queued in the guest agent (a slow fsfreeze hook,
        a hung filesystem) and may freeze the guest when it gets its turn. Ask for a thaw
        until one is answered, for at most THAW_DEADLINE seconds. libvirt 9 keeps such an
        agent marked unresponsive (measured: no command got through for 5 minutes after
        the timed-out freeze), so this usually ends in a loud error telling the admin to
        check the guest; the backup goes on (auto) or the job fails (required)."""
        deadline = time.monotonic() + THAW_DEADLINE
        while True:
            try:
                connection.thaw(domain)
                return
            except GfsError as exc:
                if time.monotonic() > deadline:
                    ctx.log.error(
                        "job %s: %s; the guest may stay frozen: check it now (virsh domfsthaw %s)",
                        ctx.job.title,
                        exc,
                        domain.name(),
                    )
                    return
            time.sleep(1)

    def _copy_shut_off(
        self, ctx: JobContext, connection: Connection, domain: Any, disks: list[Disk], folder: Path
    ) -> None:
        name = domain.name()
        ctx.log.info("job %s: domain %s is shut off: copying its disks", ctx.job.title, name)
        for disk in disks:
            ctx.runner.run(
                make_convert_command(
                    Path(disk.source),
                    disk.format,
                    folder / f"{disk.target}.qcow2",
                    rate=ctx.bandwidth,
                )
            )
            if connection.is_running(domain):
                raise GfsError(
                    f"job {ctx.job.title}: domain {name} was started while its "
                    "disks were copied: the copy is not consistent; run again"
                )

    def retire_snapshot(self, ctx: JobContext, snapshot: Snapshot, keep: int) -> None:
        return None

    def undo_entry(self, ctx: JobContext, entry: JournalEntry) -> None:
        """Undo what an interrupted run journaled (the journal names the domain): abort a
        stale backup job gfs started; commit gfs overlays back and pivot the domain onto
        its own disks. A failure leaves the entry open and fails this run."""
        if entry.action == "checkpoint":
            connection = self._connect(ctx.job, ctx.runner)
            try:
                domain = connection.domain(entry.path)
                if connection.is_running(domain):
                    connection.delete_checkpoint(domain, entry.detail)
                    ctx.log.info(
                        "job %s: deleted checkpoint %s of an interrupted run",
                        ctx.job.title,
                        entry.detail,
                    )
            except ConnectionLost:
                raise
            except GfsError as exc:
                ctx.log.warning("job %s: %s", ctx.job.title, exc)
            finally:
                connection.close()
        if entry.action == "backup-job":
            if Path(entry.detail).name.startswith("gfs-nbd-"):
                shutil.rmtree(entry.detail, ignore_errors=True)
            connection = self._connect(ctx.job, ctx.runner)
            try:
                domain = connection.domain(entry.path)
                if connection.has_backup_job(domain):
                    connection.abort_job(domain)
                    ctx.log.info(
                        "job %s: aborted stale backup job of %s", ctx.job.title, entry.path
                    )
            except ConnectionLost:
                raise  # it cannot tell whether the job is left: keep the entry open
            except GfsError as exc:
                ctx.log.warning("job %s: %s", ctx.job.title, exc)
            finally:
                connection.close()
        elif entry.action == RESTORE_TEMP and is_restore_temp(Path(entry.path)):
            disks_of(ctx).remove(Path(entry.path))  # an interrupted restore over the disks
        elif entry.action == "overlay":
            layers: dict[str, dict[str, str]] = json.loads(entry.detail)
            connection = self._connect(ctx.job, ctx.runner)
            try:
                try:
                    domain = connection.domain(entry.path)
                except GfsError:  # undefined meanwhile: keep the guest's newest writes
                    for layer in layers.values():
                        self._commit_offline(ctx, Path(layer["overlay"]))
                        Path(layer["overlay"]).unlink(missing_ok=True)
                else:
                    self._commit_layers(ctx, connection, domain, layers)
            finally:
                connection.close()
        ctx.state.done(entry.id)

    def health(self, job: Job) -> list[str]:
        """A domain left running on (or defined with) a gfs overlay by an interrupted run."""
        if job.host != LOCAL_HOST:
            return []  # no overlays there (push mode only): `gfs run` reports the rest
        try:
            connection = self._connect(job)
        except GfsError as exc:
            return [f"job {job.title}: {exc}"]
        try:
            try:
                domain = find_domain(connection, job)
            except GfsError:
                if job.parent is None:
                    raise
                return [
                    f"job {job.title}: the domain (UUID {job.options['uuid']}) is gone from "
                    f"{connection.uri}: its generations are kept; `gfs forget {job.family} "
                    f"{job.options['uuid']}` deletes them"
                ]
            warnings = []
            if job.options.get("method", "auto") in ("auto", "backup-api") and not nbd.available():
                warnings.append(
                    f"job {job.title}: python3-libnbd is not installed: every run reads the "
                    "whole disks (push mode, no changed-block capture); apt install "
                    "python3-libnbd and run scripts/install again"
                )
            for inactive in (False, True):
                for disk in parse_disks(connection.xml(domain, inactive)):
                    if is_gfs_overlay(disk.source):
                        state = "is defined with" if inactive else "runs on"
                        warnings.append(
                            f"job {job.title}: domain {domain.name()} {state} the gfs overlay "
                            f"{disk.source} (disk {disk.target}) left by an interrupted run; "
                            f"the next `gfs run {job.family}` commits it back"
                        )
            return list(dict.fromkeys(warnings))
        except GfsError as exc:
            return [f"job {job.title}: {exc}"]
        finally:
            connection.close()

    def verify_data(self, stored: Stored, progress: Progress | None) -> list[str]:
        problems = []
        runner = stored.fs.runner if isinstance(stored.fs, RemoteFS) else LocalRunner()
        for data in disk_files(stored):
            found = image_problems(runner, stored.path / data.path)
            if found:
                problems.append(f"{data.path}: qemu-img check: {found}")
        return problems

    def restore(
        self,
        ctx: JobContext,
        stored: Stored,
        to: Path,
        progress: Progress | None,
        options: RestoreOptions,
    ) -> None:
        """Copy the disks into the directory `to` and define a new domain using them,
        with every per-domain path and identity of its own (see `restore_xml`), so that it
        can start beside the original; its files are named in `options.final`, where `to`
        goes once restored. The NVRAM saved with the generation is copied there too."""
        source = stored.manifest.source
        name = options.domain_name or f"{source['domain']}-restored-{stored.id}"
        final = options.final or to
        remote = isinstance(stored.fs, RemoteFS)  # on the job's host (actions/restore.py)
        if remote:
            source_host(ctx).make_dir(to)
        else:
            to.mkdir(parents=True)
        paths: dict[str, Path] = {}
        try:
            for data in disk_files(stored):
                target = Path(data.path).stem
                disk = f"{name}-{target}{Path(data.path).suffix}"
                paths[target] = final / disk
                copy = _copy_on_host if remote else _copy_here
                copy(ctx, stored, data, to / disk)
                problems = image_problems(ctx.runner, to / disk)
                if problems:
                    raise GfsError(f"restored disk {final / disk}: {problems}")
            origin = f"domain {source['domain']}, generation {stored.id}"
            restored = restore_xml(
                str(source["xml"]), name, paths, options.keep_interfaces, final, origin
            )
            _copy_firmware_files(ctx, stored, restored, to)
            connection = self._connect(ctx.job, ctx.runner)
            try:
                connection.define(restored.xml)
            finally:
                connection.close()
        except BaseException:
            if not remote:  # on a host, actions/restore.py removes the staging
                shutil.rmtree(to, ignore_errors=True)
            raise
        for line in restored.rewritten:
            ctx.log.info("job %s: domain %s: %s", ctx.job.title, name, line)
        ctx.log.info("job %s: defined domain %s with disks in %s", ctx.job.title, name, final)

    def restore_over_original(
        self, ctx: JobContext, stored: Stored, progress: Progress | None
    ) -> list[str]:
        """Write the (checked) disks of `stored` over the disks of the job's domain, which
        must be shut off; see gfs_backup.backends.vm_inplace. Returns the disks written."""
        connection = self._connect(ctx.job, ctx.runner)
        try:
            domain = find_domain(connection, ctx.job)
            saved_uuid = stored.manifest.source.get("uuid")
            if saved_uuid and saved_uuid != domain.UUIDString():
                ctx.log.warning(
                    "job %s: domain %s has another UUID than the one backed up (%s): it "
                    "was redefined; writing over the disks it has now",
                    ctx.job.title,
                    domain.name(),
                    saved_uuid,
                )
            writes = plan_writes(ctx.job.title, stored, connection.xml(domain, inactive=True))
            return InPlaceRestore(ctx, connection, domain).run(writes)
        finally:
            connection.close()


def libvirt_uri(job: Job, runner: Runner | None) -> tuple[str, str | None]:
    """The job's libvirt as messages name it (its `uri`, and its host), and the URI opened
    for it when that differs: for a job of a remote host, the tunnel to that host's libvirt
    on the job's SSH connection (transport/virttunnel.py)."""
    uri = str(job.options.get("uri", DEFAULT_URI))
    if job.host == LOCAL_HOST:
        return uri, None
    if not isinstance(runner, SSHRunner):
        raise GfsError(f"internal: job {job.title} of host {job.host} without its SSH runner")
    return f"{uri} on host {job.host}", tunnel_for(runner, uri).uri


def connect(job: Job, runner: Runner | None) -> Connection:
    """A connection to the job's libvirt (on its host: see libvirt_uri)."""
    return Connection(*libvirt_uri(job, runner))


def _copy_host_files(ctx: JobContext, domain_xml: str, into: Path) -> list[DataFile]:
    """A remote domain's NVRAM, kernel and initrd (see _export_nvram, _export_boot_files),
    copied on its host into the generation there in one command, each copy read back from
    the target's storage and checked against what was read of the original."""
    os_element = ET.fromstring(domain_xml).find("os")
    wanted = [(NVRAM, "VARS.fd", nvram_path(domain_xml))]
    for name in ("kernel", "initrd"):
        wanted.append((BOOT, name, os_element.findtext(name) if os_element is not None else None))
    present = [(folder, name, original) for folder, name, original in wanted if original]
    if not present:
        return []
    pairs = [(Path(original), into / folder / name) for folder, name, original in present]
    copies = copy_on_host(ctx.runner, pairs, ctx.target)
    files = []
    for (folder, name, original), copied in zip(present, copies, strict=True):
        if copied is None:
            continue  # gone from the host: the domain boots without it, as here
        if not copied.intact:
            raise GfsError(
                f"job {ctx.job.title}: the copy of {original} on host {ctx.job.host} does not "
                "read back as it was written; run again"
            )
        files.append(DataFile(f"{folder}/{name}", copied.size, copied.digest))
        ctx.log.info("job %s: saved %s of host %s", ctx.job.title, original, ctx.job.host)
    return files


def copy_on_host(
    runner: Runner, pairs: list[tuple[Path, Path]], fs: TargetFS
) -> list[HostCopy | None]:
    """Files copied on the host of `runner` (COPY_SCRIPT: sparse, fsynced, read back), for
    each pair its HostCopy or None when the source does not exist. GfsError when the host
    fails or stalls (`fs`'s io_timeout without progress)."""
    idle = fs.io_timeout if isinstance(fs, RemoteFS) else 600.0
    command = make_copy_command([(str(a), str(b)) for a, b in pairs], BACKUP_TIMEOUT, idle)
    output = ScriptOutput()
    try:
        with runner.reading(command) as stream:
            while chunk := stream.read(1 << 12):
                output.feed(chunk)
        return parse_copies(output.result(), len(pairs))
    except (CommandError, ValueError) as exc:
        what = ", ".join(str(b) for _a, b in pairs)
        raise GfsError(f"copying {what} on host {runner.host} failed: {exc}") from None


def _export_nvram(ctx: JobContext, domain_xml: str, into: Path) -> list[DataFile]:
    """The domain's UEFI variable store (boot entries, secure boot keys), saved beside its
    disks: a restored domain boots with it. None when the domain has none or it is gone."""
    path = nvram_path(domain_xml)
    if path is None or not Path(path).is_file():
        return []
    (into / NVRAM).mkdir()
    copy = into / NVRAM / "VARS.fd"
    result = copy_file(Path(path), copy, verify=True)  # read back, as the disks are
    ctx.log.info("job %s: saved the NVRAM %s", ctx.job.title, path)
    return [DataFile(f"{NVRAM}/{copy.name}", result.size, result.digest)]


def _export_boot_files(
    ctx: JobContext, domain_xml: str, into: Path, previous: Stored | None
) -> list[DataFile]:
    """The host-side kernel and initrd a domain boots directly (`<os><kernel>`), saved
    beside its disks (small files, checksummed): a drill on a machine without them (a CI
    runner) boots the generation's copies. One unchanged since the previous generation is
    cloned from it (shared extents on a reflink target: no new space each night)."""
    os_element = ET.fromstring(domain_xml).find("os")
    files = []
    for name in ("kernel", "initrd"):
        text = os_element.findtext(name) if os_element is not None else None
        if not text or not Path(text).is_file():
            continue
        (into / BOOT).mkdir(exist_ok=True)
        copy = into / BOOT / name
        before = boot_file(previous, name) if previous is not None else None
        found = digest_file(Path(text))
        if (
            previous is not None
            and before is not None
            and (before.size, before.digest) == (found.size, found.digest)
        ):
            how = clone_file(previous.path / before.path, copy)
            if digest_file(copy, uncached=True).digest == found.digest:
                files.append(DataFile(f"{BOOT}/{name}", found.size, found.digest))
                ctx.log.info(
                    "job %s: %s unchanged: %s from %s", ctx.job.title, name, how, previous.id
                )
                continue
            copy.unlink()
        result = copy_file(Path(text), copy, verify=True)
        files.append(DataFile(f"{BOOT}/{name}", result.size, result.digest))
        ctx.log.info("job %s: saved the %s %s", ctx.job.title, name, text)
    return files


def _copy_firmware_files(
    ctx: JobContext, stored: Stored, restored: RestoredDomain, to: Path
) -> None:
    """The restored domain's own NVRAM (from the generation, else as it is on this host
    now) and writable loader, at the new paths `restore_xml` chose (in `to`)."""
    saved = nvram_file(stored)
    remote = isinstance(stored.fs, RemoteFS)
    for what, new, old in restored.copies:
        source = stored.path / saved.path if what == "nvram" and saved else Path(old)
        if remote:
            if what == "nvram" and saved is not None:
                _copy_on_host(ctx, stored, saved, to / new.name)
            elif source_host(ctx).exists(source):
                ctx.runner.run(Command(("cp", "--", str(source), str(to / new.name)), True))
            else:
                ctx.log.warning(
                    "job %s: no %s to copy (%s is gone from host %s): the restored domain "
                    "starts with its firmware's template",
                    ctx.job.title,
                    what,
                    old,
                    ctx.job.host,
                )
            continue
        if not source.is_file():
            ctx.log.warning(
                "job %s: no %s to copy (%s is gone): the restored domain starts with its "
                "firmware's template",
                ctx.job.title,
                what,
                old,
            )
            continue
        result = copy_file(source, to / new.name)
        if saved is not None and what == "nvram" and result.digest != saved.digest:
            raise GfsError(f"{saved.path}: the copy does not match the manifest's checksum")


def _copy_here(ctx: JobContext, stored: Stored, data: DataFile, to: Path) -> None:
    copied = copy_file(stored.path / data.path, to)
    if (copied.size, copied.digest) != (data.size, data.digest):
        raise GfsError(
            f"{stored.path / data.path}: the copy does not match the manifest's "
            "checksum (the generation's data is corrupted)"
        )


def _copy_on_host(ctx: JobContext, stored: Stored, data: DataFile, to: Path) -> None:
    """A file of a generation on the job's host's target, copied there to `to` (a new
    path on that host) and checked against the manifest, as read and as read back."""
    source = stored.path / data.path
    (copied,) = copy_on_host(ctx.runner, [(source, to)], stored.fs)
    if copied is None:
        raise GfsError(f"{source} on host {ctx.job.host}: missing from the generation")
    wanted = (data.size, data.digest)
    if (copied.size, copied.digest) != wanted or (copied.copy_size, copied.copy_digest) != wanted:
        raise GfsError(
            f"{source} on host {ctx.job.host}: the copy does not match the manifest's "
            "checksum (the generation's data is corrupted)"
        )


def _check_disk_path(job: str, disk: Disk) -> None:
    """A file disk must be a regular file, a block disk a block device: anything else (a
    missing image, a directory, a device node of another kind) is no disk gfs can copy."""
    path = Path(disk.source)
    wanted = {
        "file": (Path.is_file, "an image file"),
        "block": (Path.is_block_device, "a block device"),
    }
    test, what = wanted[disk.source_type]
    if not test(path):
        found = "does not exist" if not path.exists() else "is something else"
        raise SourceError(
            f"job {job}: disk {disk.target} should be {what} but {path} {found}: fix the "
            "domain's definition, or name the disks to back up with disks = [...]"
        )


def qemu_img_problems(runner: Runner, image: Path) -> str:
    """What `qemu-img check` says is wrong with a qcow2 image ("" when it is sound)."""
    done = runner.run(make_check_command(image), check=False)
    return "" if done.returncode == 0 else " ".join((done.stdout + done.stderr).split())[-300:]


def image_problems(runner: Runner, image: Path) -> str:
    """`qemu-img check` of a qcow2 image; a raw image has no structure to check."""
    return "" if image_format(image) == "raw" else qemu_img_problems(runner, image)
