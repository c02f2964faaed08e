"""libvirt, through libvirt-python: the only module that imports it.

The domain XML gfs reads and writes is in gfs_backup.tools.domainxml (pure functions).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gfs_backup.core.config import DEFAULT_LIBVIRT_URI
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.tools.domainxml import Disk, parse_disks, with_disk_sources

DEFAULT_URI = DEFAULT_LIBVIRT_URI
POLL_SECONDS = 0.2
# libvirtd restarted (package upgrade, admin): how long gfs waits for it to answer again.
RECONNECT_SECONDS = 60.0
RECONNECT_POLL_SECONDS = 1.0
# After a restart libvirt 9 may keep a backup job whose QEMU job is gone (it drops the
# block job "untracked by qemu"): it never ends and has no disk statistics (measured). And
# until its reconnect thread has recovered the domain, a restarted libvirtd reports no job
# at all for a job it is about to recover (seen in CI under load). So after a restart, "no
# job" or "a job without disk statistics" is believed only once it held this long.
LOST_JOB_SECONDS = 15.0

log = logging.getLogger("gfs.virt")

PIVOT_POLL_SECONDS = 0.1


class VirtError(GfsError):
    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class DomainInfo:
    """A domain as `Connection.domains` lists it. `xml`: its persistent definition (the
    live one for a transient domain); None with `error` when it could not be read."""

    name: str
    uuid: str
    persistent: bool
    active: bool
    xml: str | None
    error: str | None = None


class BackupUnsupported(VirtError):
    """This libvirt/QEMU cannot do push-mode backups (the snapshot method can)."""


class CheckpointUnusable(VirtError):
    """The checkpoint an incremental backup starts from is missing or its bitmap is broken
    (a host crash, QEMU killed, deleted behind gfs's back): a full read is needed."""


class ConnectionLost(VirtError):
    """The connection to libvirtd broke and gfs could not (or did not) open it again, so it
    cannot tell what became of a job it started: the journal entry must stay open."""


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise VirtError(
            "libvirt jobs need libvirt's Python module: apt install python3-libvirt, then "
            "run scripts/install again (it links the module into gfs's virtualenv)"
        ) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # exceptions suffice
    return libvirt


LIBVIRTD = ("libvirtd", "virtqemud")  # the monolithic daemon or the modular QEMU one


def _hint(uri: str) -> str:
    """Why a local connection may fail: libvirt not installed, or its daemon not running."""
    if not uri.startswith("qemu:///"):
        return ""
    if not any(shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") for name in LIBVIRTD):
        return (
            " (libvirt is not installed on this host: apt install libvirt-daemon-system "
            "libvirt-daemon-driver-qemu)"
        )
    return " (is libvirtd running? systemctl start libvirtd)"


def list_domains(uri: str, via: str | None = None) -> list[DomainInfo]:
    """Every domain at `uri` (see `Connection.domains`), on a connection of its own (opened
    `via` that URI when given). VirtError when libvirt is missing or libvirtd does not answer."""
    connection = Connection(uri, via)
    try:
        return connection.domains()
    finally:
        connection.close()


class Connection:
    """One libvirt connection; errors become VirtError with the domain named.

    Waiting for a job (wait_backup, pivot_when_ready) survives a libvirtd restart: the
    connection is opened again and domain handles of the broken one are mapped, by UUID, to
    handles on the new one (see `_live`), so callers keep the handles they hold.
    """

    def __init__(self, uri: str, via: str | None = None) -> None:
        """`uri`: the libvirt as named in messages; `via`: the URI opened when it differs
        (a remote host's libvirt through gfs's tunnel: transport/virttunnel.py)."""
        self.lib = _libvirt()
        self.uri = uri
        self._address = via or uri
        self._handles: dict[str, Any] = {}  # UUID -> handle on self.conn, after a reconnect
        try:
            self.conn = self.lib.open(self._address)
        except self.lib.libvirtError as exc:
            hint = _hint(uri) if via is None else ""  # a remote host's: checked by tunnel_for
            raise VirtError(f"cannot connect to libvirt at {uri}: {exc}{hint}") from None

    def close(self) -> None:
        with contextlib.suppress(self.lib.libvirtError):  # a broken connection closes too
            self.conn.close()

    def domain(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except self.lib.libvirtError:
            raise VirtError(
                f"domain {name!r} does not exist on {self.uri} (virsh list --all shows the domains)"
            ) from None

    def find(self, name: str) -> Any | None:
        """The domain called `name`, None when there is none (VirtError when libvirt fails)."""
        try:
            return self.conn.lookupByName(name)
        except self.lib.libvirtError as exc:
            if exc.get_error_code() == self.lib.VIR_ERR_NO_DOMAIN:
                return None
            raise VirtError(f"cannot look up domain {name!r} at {self.uri}: {exc}") from None

    def domain_by_uuid(self, uuid: str, name: str) -> Any:
        """The domain with `uuid` (`name`: what it was called, for the error)."""
        try:
            return self.conn.lookupByUUIDString(uuid)
        except self.lib.libvirtError:
            raise VirtError(
                f"domain {name!r} (UUID {uuid}) does not exist on {self.uri} any more "
                "(undefined or migrated while gfs ran?)"
            ) from None

    def domains(self) -> list[DomainInfo]:
        """Every domain libvirt knows, running or not, persistent or transient. VirtError
        when libvirtd does not answer (never an empty list for a dead daemon)."""
        try:
            found = self.conn.listAllDomains(0)
        except self.lib.libvirtError as exc:
            raise VirtError(f"cannot list the domains at {self.uri}: {exc}") from None
        listed = []
        for domain in found:
            try:
                name, uuid = domain.name(), domain.UUIDString()
            except self.lib.libvirtError:
                continue  # undefined while listing
            try:
                persistent = bool(domain.isPersistent())
                active = bool(domain.isActive())
                flags = self.lib.VIR_DOMAIN_XML_INACTIVE if persistent else 0
                xml = str(domain.XMLDesc(flags))
            except self.lib.libvirtError as exc:
                listed.append(DomainInfo(name, uuid, True, False, None, str(exc)))
                continue
            listed.append(DomainInfo(name, uuid, persistent, active, xml))
        return sorted(listed, key=lambda info: info.name)

    def _live(self, domain: Any) -> Any:
        """The handle of `domain` on the current connection: itself, or after a reconnect
        the same domain (by UUID) looked up again. Raises libvirtError when it is gone."""
        if domain.connect() is self.conn:
            return domain
        uuid = domain.UUIDString()  # name and UUID are cached in the handle: no call
        if uuid not in self._handles:
            self._handles[uuid] = self.conn.lookupByUUIDString(uuid)
        return self._handles[uuid]

    def _broken(self) -> bool:
        """True when the connection is dead (libvirtd stopped or restarted)."""
        try:
            return not self.conn.isAlive()
        except self.lib.libvirtError:
            return True

    def _reconnect(self, what: str) -> None:
        """Open self.uri again, every RECONNECT_POLL_SECONDS for RECONNECT_SECONDS.

        `what` names the job for the error. Raises ConnectionLost when libvirtd does not
        answer in time.
        """
        log.warning("%s: lost the connection to libvirt at %s; reconnecting", what, self.uri)
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                conn = self.lib.open(self._address)
                break
            except self.lib.libvirtError:
                if time.monotonic() > deadline:
                    raise ConnectionLost(
                        f"{what}: libvirtd at {self.uri} went away and did not come back "
                        f"within {RECONNECT_SECONDS:.0f} s; no generation was made; start "
                        "libvirtd: the next run aborts the job if it is left"
                    ) from None
            time.sleep(RECONNECT_POLL_SECONDS)
        self.close()
        self.conn = conn
        self._handles.clear()
        log.warning("%s: reconnected to libvirt at %s", what, self.uri)

    def is_running(self, domain: Any) -> bool:
        try:
            state = self._live(domain).state()[0]
        except self.lib.libvirtError as exc:
            raise VirtError(f"domain {domain.name()}: cannot read its state: {exc}") from None
        return bool(state in (self.lib.VIR_DOMAIN_RUNNING, self.lib.VIR_DOMAIN_PAUSED))

    def xml(self, domain: Any, inactive: bool = False) -> str:
        flags = self.lib.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        try:
            return str(self._live(domain).XMLDesc(flags))
        except self.lib.libvirtError as exc:
            raise VirtError(f"domain {domain.name()}: cannot read its XML: {exc}") from None

    def define(self, xml: str) -> Any:
        try:
            return self.conn.defineXML(xml)
        except self.lib.libvirtError as exc:
            raise VirtError(f"libvirt refused the domain definition: {exc}") from None

    def has_backup_job(self, domain: Any) -> bool:
        """True when a backup job runs on `domain`, False when none does (or the domain is
        not running). Raises ConnectionLost when the connection is broken: then nobody
        knows, and a gfs journal entry for the job must stay open."""
        try:
            stats = self._live(domain).jobStats()
        except self.lib.libvirtError as exc:
            if self._broken():
                raise ConnectionLost(
                    f"domain {domain.name()}: cannot tell whether a backup job is left: the "
                    f"connection to libvirt at {self.uri} is broken ({exc})"
                ) from None
            return False
        return bool(
            stats.get("type", 0)
            in (self.lib.VIR_DOMAIN_JOB_BOUNDED, self.lib.VIR_DOMAIN_JOB_UNBOUNDED)
            and stats.get("operation") == self.lib.VIR_DOMAIN_JOB_OPERATION_BACKUP
        )

    def backup_job_after_restart(self, domain: Any, what: str) -> bool:
        """`has_backup_job`, surviving a libvirtd restart: a broken connection is opened
        again (ConnectionLost when libvirtd does not come back), and then "no job" is
        believed only once it held LOST_JOB_SECONDS (a restarted libvirtd reports a job it
        is still recovering as none)."""
        if not self._broken():
            try:
                return self.has_backup_job(domain)
            except ConnectionLost:  # libvirt says it is alive until a call fails
                pass
        self._reconnect(what)
        deadline = time.monotonic() + LOST_JOB_SECONDS
        while not self.has_backup_job(domain):
            if time.monotonic() > deadline:
                return False
            time.sleep(RECONNECT_POLL_SECONDS)
        return True

    def abort_job(self, domain: Any) -> None:
        try:
            self._live(domain).abortJob()
        except self.lib.libvirtError as exc:
            raise VirtError(f"cannot abort the backup job of {domain.name()}: {exc}") from None

    def agent_answers(self, domain: Any, timeout: int) -> bool:
        """True when the guest agent answers a ping within `timeout` seconds."""
        try:
            import libvirt_qemu

            libvirt_qemu.qemuAgentCommand(
                self._live(domain), '{"execute": "guest-ping"}', timeout, 0
            )
        except (ImportError, self.lib.libvirtError):
            return False
        return True

    def freeze(self, domain: Any, timeout: int) -> None:
        """Freeze the guest's filesystems through its agent (fsfreeze)."""
        try:
            live = self._live(domain)
            live.agentSetResponseTimeout(timeout, 0)
            live.fsFreeze(None, 0)
        except self.lib.libvirtError as exc:
            raise VirtError(
                f"domain {domain.name()}: the guest agent could not freeze the filesystems: {exc}"
            ) from None

    def thaw(self, domain: Any) -> None:
        try:
            self._live(domain).fsThaw(None, 0)
        except self.lib.libvirtError as exc:
            raise VirtError(
                f"domain {domain.name()}: thawing the guest filesystems failed: "
                f"{exc}; check the guest now"
            ) from None

    def begin_backup(self, domain: Any, xml: str, checkpoint_xml: str | None = None) -> None:
        """Start a backup job (push or pull mode, as `xml` says), creating the checkpoint
        `checkpoint_xml` at the same instant when given. Raises VirtError when libvirt
        refuses it: CheckpointUnusable when the incremental base's checkpoint is missing or
        its bitmap is broken, BackupUnsupported when there is no backup API here."""
        try:
            self._live(domain).backupBegin(xml, checkpoint_xml, 0)
        except self.lib.libvirtError as exc:
            if exc.get_error_code() in (
                self.lib.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                self.lib.VIR_ERR_CHECKPOINT_INCONSISTENT,
            ):
                raise CheckpointUnusable(str(exc)) from None
            if exc.get_error_code() in (
                self.lib.VIR_ERR_NO_SUPPORT,
                self.lib.VIR_ERR_OPERATION_UNSUPPORTED,
            ):
                raise BackupUnsupported(
                    f"domain {domain.name()}: no backup API here ({exc})"
                ) from None
            hint = ""
            if "No such file or directory" in str(exc):
                hint = (
                    "; QEMU cannot see the target: mount it before the domain starts or "
                    "make / a shared mount (mount --make-rshared /), as systemd does"
                )
            raise VirtError(
                f"domain {domain.name()}: backup could not start: {exc}{hint}"
            ) from None

    def checkpoints(self, domain: Any) -> list[str]:
        """The names of the domain's checkpoints."""
        try:
            return [item.getName() for item in self._live(domain).listAllCheckpoints(0)]
        except self.lib.libvirtError as exc:
            raise VirtError(f"domain {domain.name()}: cannot list its checkpoints: {exc}") from None

    def delete_checkpoint(self, domain: Any, name: str) -> None:
        """Delete a checkpoint with its bitmap in the disks (the domain must run: libvirt
        9 cannot remove a bitmap from a shut-off domain's images). A checkpoint whose bitmap
        is gone already loses its metadata only."""
        try:
            checkpoint = self._live(domain).checkpointLookupByName(name)
        except self.lib.libvirtError:
            return  # gone already
        try:
            checkpoint.delete(0)
        except self.lib.libvirtError as exc:
            if "not found" not in str(exc):
                raise VirtError(
                    f"domain {domain.name()}: cannot delete checkpoint {name}: {exc}"
                ) from None
            try:
                checkpoint.delete(self.lib.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except self.lib.libvirtError as again:
                raise VirtError(
                    f"domain {domain.name()}: cannot delete checkpoint {name}: {again}"
                ) from None

    def create_overlays(self, domain: Any, xml: str) -> None:
        """A disk-only external snapshot without libvirt metadata: from now on the guest
        writes into the overlays and the disks below them are frozen in time."""
        flags = (
            self.lib.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | self.lib.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | self.lib.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        try:
            self._live(domain).snapshotCreateXML(xml, flags)
        except self.lib.libvirtError as exc:
            raise VirtError(
                f"domain {domain.name()}: the disk-only snapshot failed: {exc}"
            ) from None

    def disk_source(self, domain: Any, target: str, inactive: bool = False) -> str | None:
        for disk in parse_disks(self.xml(domain, inactive)):
            if disk.target == target:
                return disk.source
        return None

    def start_commit(self, domain: Any, target: str, bandwidth: int) -> None:
        """Start merging the overlay of disk `target` into the disk below it (active block
        commit; `bandwidth` bytes/s, 0 = unlimited). A commit job already running on the
        disk (from a run that was killed) is left to go on, not restarted."""
        name = domain.name()
        job = self._block_job(domain, target)
        if job is None:
            flags = self.lib.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
            if bandwidth:
                flags |= self.lib.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
            try:
                self._live(domain).blockCommit(target, None, None, bandwidth, flags)
            except self.lib.libvirtError as exc:
                raise VirtError(
                    f"domain {name}: cannot commit the gfs overlay of {target} back: {exc}; "
                    "the next gfs run retries (gfs check shows the domain)"
                ) from None
        elif job.get("type") != self.lib.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT:
            raise VirtError(
                f"domain {name}: disk {target} has another block job running; "
                "its gfs overlay is committed back by the next run"
            )

    def pivot_when_ready(self, domain: Any, target: str, overlay: str, timeout: float) -> None:
        """Wait until the commit job of `target` has caught up, then pivot the domain onto
        the disk below its `overlay` (the job ends; the overlay is no longer used). A
        libvirtd restart meanwhile is survived: libvirt 9 recovers block jobs; a pivot
        whose answer was lost in the restart shows as the disk no longer on `overlay`."""
        name = domain.name()
        deadline = time.monotonic() + timeout
        restarted = False
        while True:
            job = self._block_job(domain, target)
            if job is None and self._broken():
                self._reconnect(f"domain {name}: committing the overlay of {target}")
                restarted = True
                continue
            if job is None and restarted and self.disk_source(domain, target) != overlay:
                return  # pivoted just before libvirtd went away
            if job is None:
                raise VirtError(f"domain {name}: the commit job of {target} vanished")
            if job.get("end") and job.get("cur") == job.get("end"):
                try:
                    self._live(domain).blockJobAbort(
                        target, self.lib.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
                    )
                    return
                except self.lib.libvirtError:
                    pass  # not ready for the pivot yet (or libvirtd went away: see above)
            if time.monotonic() > deadline:
                raise VirtError(
                    f"domain {name}: committing the overlay of {target} did not finish in "
                    f"{timeout:.0f} s; the next gfs run retries"
                )
            time.sleep(PIVOT_POLL_SECONDS)

    def _block_job(self, domain: Any, target: str) -> dict[str, Any] | None:
        try:
            info = self._live(domain).blockJobInfo(target, 0)
        except self.lib.libvirtError:
            return None
        return dict(info) if info else None

    def redefine_disks(self, domain: Any, sources: dict[str, Disk]) -> bool:
        """Point the persistent definition's disks back at `sources` where it still names
        something else (an overlay). True when it was changed."""
        if not self._live(domain).isPersistent():
            return False
        xml = self.xml(domain, inactive=True)
        current = {disk.target: disk.source for disk in parse_disks(xml)}
        if all(current.get(target) == disk.source for target, disk in sources.items()):
            return False
        self.define(with_disk_sources(xml, sources))
        return True

    def wait_backup(
        self, domain: Any, progress: Callable[[int], None] | None, timeout: float
    ) -> dict[str, Any]:
        """Wait for the backup job; the completed job's statistics.

        A libvirtd restart meanwhile is survived (the connection is opened again): a job
        libvirt recovered is waited for, one it lost ends in a VirtError saying so. Raises
        VirtError when the job fails, the domain stops, or it times out (then the job is
        aborted); ConnectionLost when libvirtd does not come back (see _reconnect).
        """
        name = domain.name()
        deadline = time.monotonic() + timeout
        done = 0
        restarted = False
        lost_since: float | None = None
        while True:
            stats = self._backup_stats(domain, name)
            if stats is None:
                self._reconnect(f"domain {name}: backup")
                restarted = True
                continue
            if restarted and self._unsure(stats):  # lost, or not recovered yet
                if (result := self._ended_job(domain, name, stats)) is not None:
                    return self._judged(result, name, restarted)
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > LOST_JOB_SECONDS:
                    raise VirtError(_lost_job_message(name))  # the caller aborts one kept
                time.sleep(POLL_SECONDS)
                continue
            if stats.get("type", 0) == self.lib.VIR_DOMAIN_JOB_NONE:
                break
            lost_since = None
            processed = int(stats.get("disk_processed", stats.get("data_processed", 0)))
            if progress is not None and processed > done:
                progress(processed - done)
                done = processed
            if time.monotonic() > deadline:
                self.abort_job(domain)
                raise VirtError(
                    f"domain {name}: backup did not finish in {timeout:.0f} s (aborted)"
                )
            time.sleep(POLL_SECONDS)
        return self._judged(self._job_result(domain, name), name, restarted)

    def _unsure(self, stats: dict[str, Any]) -> bool:
        """After a restart: no job, or a job without disk statistics (see LOST_JOB_SECONDS)."""
        return stats.get("type", 0) == self.lib.VIR_DOMAIN_JOB_NONE or "disk_total" not in stats

    def _ended_job(self, domain: Any, name: str, stats: dict[str, Any]) -> dict[str, Any] | None:
        """The result of a job that ended (while libvirtd was away, or since), else None."""
        if stats.get("type", 0) != self.lib.VIR_DOMAIN_JOB_NONE:
            return None
        result = self._job_result(domain, name)
        return None if result.get("type", 0) == self.lib.VIR_DOMAIN_JOB_NONE else result

    def _backup_stats(self, domain: Any, name: str) -> dict[str, Any] | None:
        """The current job's statistics; None when the connection is broken. Raises
        VirtError when the domain stopped or libvirt cannot say."""
        try:
            return dict(self._live(domain).jobStats())
        except self.lib.libvirtError as exc:
            if self._broken():
                return None
            if not self._still_running(domain):
                raise VirtError(
                    f"domain {name} stopped during its backup: no generation "
                    "was made; the next run backs it up (running or shut "
                    "off)"
                ) from None
            raise VirtError(f"domain {name}: lost the backup job: {exc}") from None

    def _still_running(self, domain: Any) -> bool:
        try:
            return self.is_running(domain)
        except VirtError:
            return False

    def _judged(self, result: dict[str, Any], name: str, restarted: bool) -> dict[str, Any]:
        """`result`, the statistics of the job that just ended, if it succeeded; else a
        VirtError saying why. libvirt hands them out once; a restart that loses the job
        leaves none (`restarted` says so)."""
        if result.get("type") == self.lib.VIR_DOMAIN_JOB_COMPLETED:
            return result
        if restarted and result.get("type", 0) == self.lib.VIR_DOMAIN_JOB_NONE:
            raise VirtError(_lost_job_message(name))
        message = result.get("errmsg", "no reason given")
        raise VirtError(f"domain {name}: backup failed: {message}")

    def _job_result(self, domain: Any, name: str) -> dict[str, Any]:
        """libvirt's statistics of the domain's last ended job."""
        try:
            return dict(self._live(domain).jobStats(self.lib.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except self.lib.libvirtError as exc:
            raise VirtError(
                f"domain {name}: backup ended without a result ({exc}); the "
                "domain stopped or libvirtd restarted"
            ) from None


def _lost_job_message(name: str) -> str:
    return (
        f"domain {name}: libvirtd restarted during the backup and the backup job was "
        "lost; no generation was made; the next run backs it up"
    )
