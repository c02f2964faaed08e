"""libvirt domains: a running domain through libvirt's push-mode backup API, a shut-off one
by copying its disks with `qemu-img convert`; one qcow2 per disk, the domain XML in the
manifest."""

from __future__ import annotations

import shutil
import time
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
from gfs_backup.catalog import Stored
from gfs_backup.config import Job
from gfs_backup.copy import digest_file
from gfs_backup.errors import GfsError
from gfs_backup.faults import crash_point
from gfs_backup.manifest import DataFile
from gfs_backup.runner import Command, LocalRunner, Runner
from gfs_backup.state import JournalEntry
from gfs_backup.virt import DEFAULT_URI, Connection, Disk, backup_xml, parse_disks, restore_xml

DISKS = "disks"
BACKUP_TIMEOUT = 24 * 3600.0
AGENT_TIMEOUT = 10  # seconds the guest agent may take to answer, to freeze
LOCAL_SOURCES = ("file", "block")


def make_convert_command(source: Path, source_format: str, destination: Path) -> Command:
    """qemu-img convert to qcow2; zero clusters are not written (sparse)."""
    return Command(
        ("qemu-img", "convert", "-f", source_format, "-O", "qcow2", str(source), str(destination)),
        mutating=True,
        timeout=BACKUP_TIMEOUT,
    )


def make_check_command(image: Path) -> Command:
    return Command(("qemu-img", "check", "-f", "qcow2", str(image)))


def selected_disks(job: Job, disks: list[Disk]) -> list[Disk]:
    """The job's `disks` (all when not set). Raises SourceError for unknown names."""
    wanted = job.options.get("disks")
    if not wanted:
        return disks
    by_target = {disk.target: disk for disk in disks}
    unknown = [name for name in wanted if name not in by_target]
    if unknown:
        raise SourceError(
            f"job {job.name}: domain {job.options['domain']} has no disk "
            f"{', '.join(unknown)} (disks: {', '.join(by_target)})"
        )
    return [by_target[name] for name in wanted]


class LibvirtBackend:
    kind = "libvirt"

    def _connect(self, job: Job) -> Connection:
        return Connection(str(job.options.get("uri", DEFAULT_URI)))

    def sources(self, job: Job) -> list[Path]:
        try:
            connection = self._connect(job)
        except GfsError:
            return []
        try:
            domain = connection.domain(job.options["domain"])
            return [Path(disk.source) for disk in parse_disks(connection.xml(domain))]
        except GfsError:
            return []
        finally:
            connection.close()

    def check_source(self, ctx: JobContext) -> None:
        connection = self._connect(ctx.job)
        try:
            domain = connection.domain(ctx.job.options["domain"])
            for disk in selected_disks(ctx.job, parse_disks(connection.xml(domain))):
                if disk.source_type not in LOCAL_SOURCES or not disk.source:
                    raise SourceError(
                        f"job {ctx.job.name}: disk {disk.target} is a "
                        f"{disk.source_type} disk ({disk.source or 'no path'}): "
                        "gfs backs up file and block device disks only"
                    )
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
        connection = self._connect(ctx.job)
        try:
            domain = connection.domain(ctx.job.options["domain"])
            live_xml = connection.xml(domain)
            disks = selected_disks(ctx.job, parse_disks(live_xml))
            folder = into / DISKS
            folder.mkdir()
            running = connection.is_running(domain)
            facts: dict[str, Any] = {"consistency": "offline"}
            if running:
                facts = self._backup_running(ctx, connection, domain, disks, folder, progress)
            else:
                self._copy_shut_off(ctx, connection, domain, disks, folder)
            source = {
                "domain": domain.name(),
                "uuid": domain.UUIDString(),
                "uri": connection.uri,
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
                **facts,
            }
        finally:
            connection.close()
        files = []
        for disk in disks:
            image = folder / f"{disk.target}.qcow2"
            problems = qemu_img_problems(ctx.runner, image)
            if problems:
                raise GfsError(
                    f"job {ctx.job.name}: exported disk {disk.target} is not a "
                    f"sound qcow2: {problems}"
                )
            result = digest_file(image)
            files.append(DataFile(f"{DISKS}/{image.name}", result.size, result.digest))
        written = sum(f.size for f in files)
        return Exported(files=tuple(files), source=source, bytes_written=written)

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
        mode = str(ctx.job.options.get("quiesce", "auto"))
        frozen = mode != "off" and connection.agent_answers(domain, AGENT_TIMEOUT)
        if mode == "required" and not frozen:
            raise GfsError(
                f'job {ctx.job.name}: quiesce = "required" but the guest agent of '
                f"{name} does not answer (install and start qemu-guest-agent, add "
                "the org.qemu.guest_agent.0 channel)"
            )
        entry = ctx.state.journal(ctx.run_id, ctx.job.name, "backup-job", name)
        ctx.log.info(
            "job %s: backup of running domain %s (%s)%s",
            ctx.job.name,
            name,
            ", ".join(d.target for d in disks),
            ", guest frozen" if frozen else "",
        )
        frozen_for = 0.0
        try:
            started = time.monotonic()
            if frozen:
                connection.freeze(domain, AGENT_TIMEOUT)
            try:
                connection.begin_backup(domain, backup_xml(disks, folder))
            finally:
                if frozen:
                    connection.thaw(domain)
                    frozen_for = time.monotonic() - started
            crash_point("mid-export")
            connection.wait_backup(domain, progress, BACKUP_TIMEOUT)
        finally:
            if connection.has_backup_job(domain):
                connection.abort_job(domain)
            ctx.state.done(entry)
        consistency = "application-consistent" if frozen else "crash-consistent"
        return {"consistency": consistency, "frozen_seconds": round(frozen_for, 3)}

    def _copy_shut_off(
        self, ctx: JobContext, connection: Connection, domain: Any, disks: list[Disk], folder: Path
    ) -> None:
        name = domain.name()
        ctx.log.info("job %s: domain %s is shut off: copying its disks", ctx.job.name, name)
        for disk in disks:
            ctx.runner.run(
                make_convert_command(
                    Path(disk.source), disk.format, folder / f"{disk.target}.qcow2"
                )
            )
            if connection.is_running(domain):
                raise GfsError(
                    f"job {ctx.job.name}: domain {name} was started while its "
                    "disks were copied: the copy is not consistent; run again"
                )

    def retire_snapshot(self, ctx: JobContext, snapshot: Snapshot, keep: int) -> None:
        return None

    def undo_entry(self, ctx: JobContext, entry: JournalEntry) -> None:
        """Abort a backup job an interrupted run started (the journal names the domain)."""
        if entry.action == "backup-job":
            connection = self._connect(ctx.job)
            try:
                domain = connection.domain(entry.path)
                if connection.has_backup_job(domain):
                    connection.abort_job(domain)
                    ctx.log.info("job %s: aborted stale backup job of %s", ctx.job.name, entry.path)
            except GfsError as exc:
                ctx.log.warning("job %s: %s", ctx.job.name, exc)
            finally:
                connection.close()
        ctx.state.done(entry.id)

    def verify_data(self, stored: Stored, progress: Progress | None) -> list[str]:
        problems = []
        for data in stored.manifest.files:
            found = qemu_img_problems(LocalRunner(), stored.path / data.path)
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
        """Copy the disks into the directory `to` and define a new domain using them."""
        source = stored.manifest.source
        name = options.domain_name or f"{source['domain']}-restored-{stored.id}"
        to.mkdir(parents=True)
        paths: dict[str, Path] = {}
        try:
            for data in stored.manifest.files:
                target = Path(data.path).stem
                paths[target] = to / f"{name}-{target}.qcow2"
                shutil.copyfile(stored.path / data.path, paths[target])
                problems = qemu_img_problems(ctx.runner, paths[target])
                if problems:
                    raise GfsError(f"restored disk {paths[target]}: {problems}")
            connection = self._connect(ctx.job)
            try:
                connection.define(
                    restore_xml(str(source["xml"]), name, paths, options.keep_interfaces)
                )
            finally:
                connection.close()
        except BaseException:
            shutil.rmtree(to, ignore_errors=True)
            raise
        ctx.log.info("job %s: defined domain %s with disks in %s", ctx.job.name, name, to)


def qemu_img_problems(runner: Runner, image: Path) -> str:
    """What `qemu-img check` says is wrong with a qcow2 image ("" when it is sound)."""
    done = runner.run(make_check_command(image), check=False)
    return "" if done.returncode == 0 else " ".join((done.stdout + done.stderr).split())[-300:]
