"""libvirt, through libvirt-python: the only module that imports it.

Domain XML is parsed with ElementTree here (pure functions, tested on recorded XML).
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfs_backup.errors import ExitCode, GfsError

DEFAULT_URI = "qemu:///system"
POLL_SECONDS = 0.2


class VirtError(GfsError):
    exit_code = ExitCode.FAILED


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise VirtError(
            "libvirt jobs need libvirt-python: pip install 'gfs-backup[libvirt]' "
            "(and the libvirt-dev package to build it)"
        ) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # exceptions suffice
    return libvirt


@dataclass(frozen=True)
class Disk:
    """A disk of a domain: target name (vda), source path, format (qcow2/raw), type."""

    target: str
    source: str
    format: str
    source_type: str  # file | block | volume | network


def parse_disks(domain_xml: str) -> list[Disk]:
    """The domain's disks with device='disk' (no cdroms/floppies), in XML order."""
    root = ET.fromstring(domain_xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        if target is None or source is None:
            continue
        path = source.get("file") or source.get("dev") or source.get("volume") or ""
        disks.append(
            Disk(
                target.get("dev", ""),
                path,
                driver.get("type", "raw") if driver is not None else "raw",
                disk.get("type", "file"),
            )
        )
    return disks


def backup_xml(disks: list[Disk], into: Path) -> str:
    """A push-mode <domainbackup>: every listed disk to `into/<target>.qcow2`."""
    root = ET.Element("domainbackup", mode="push")
    element = ET.SubElement(root, "disks")
    for disk in disks:
        item = ET.SubElement(element, "disk", name=disk.target, backup="yes", type="file")
        ET.SubElement(item, "driver", type="qcow2")
        ET.SubElement(item, "target", file=str(into / f"{disk.target}.qcow2"))
    return ET.tostring(root, encoding="unicode")


def restore_xml(
    domain_xml: str, name: str, disk_paths: dict[str, Path], keep_interfaces: bool
) -> str:
    """The saved domain XML as a new domain: new name, no UUID, disks at new qcow2 paths."""
    root = ET.fromstring(domain_xml)
    root.find("name").text = name  # type: ignore[union-attr]
    for tag in ("uuid",):
        for element in root.findall(tag):
            root.remove(element)
    devices = root.find("devices")
    assert devices is not None
    for disk in devices.findall("disk"):
        target = disk.find("target")
        if target is None or target.get("dev") not in disk_paths:
            if disk.get("device", "disk") == "disk":
                devices.remove(disk)
            continue
        disk.set("type", "file")
        for source in disk.findall("source"):
            disk.remove(source)
        ET.SubElement(disk, "source", file=str(disk_paths[target.get("dev", "")]))
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", name="qemu")
        driver.set("type", "qcow2")
        for stale in disk.findall("backingStore"):
            disk.remove(stale)
    if not keep_interfaces:
        for interface in devices.findall("interface"):
            devices.remove(interface)
    return ET.tostring(root, encoding="unicode")


class Connection:
    """One libvirt connection; errors become VirtError with the domain named."""

    def __init__(self, uri: str) -> None:
        self.lib = _libvirt()
        self.uri = uri
        try:
            self.conn = self.lib.open(uri)
        except self.lib.libvirtError as exc:
            raise VirtError(f"cannot connect to libvirt at {uri}: {exc}") from None

    def close(self) -> None:
        self.conn.close()

    def domain(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except self.lib.libvirtError:
            raise VirtError(
                f"domain {name!r} does not exist on {self.uri} (virsh list --all shows the domains)"
            ) from None

    def is_running(self, domain: Any) -> bool:
        return bool(domain.state()[0] in (self.lib.VIR_DOMAIN_RUNNING, self.lib.VIR_DOMAIN_PAUSED))

    def xml(self, domain: Any, inactive: bool = False) -> str:
        flags = self.lib.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(domain.XMLDesc(flags))

    def define(self, xml: str) -> Any:
        try:
            return self.conn.defineXML(xml)
        except self.lib.libvirtError as exc:
            raise VirtError(f"libvirt refused the restored domain: {exc}") from None

    def has_backup_job(self, domain: Any) -> bool:
        try:
            stats = domain.jobStats()
        except self.lib.libvirtError:
            return False
        return bool(
            stats.get("type", 0)
            in (self.lib.VIR_DOMAIN_JOB_BOUNDED, self.lib.VIR_DOMAIN_JOB_UNBOUNDED)
            and stats.get("operation") == self.lib.VIR_DOMAIN_JOB_OPERATION_BACKUP
        )

    def abort_job(self, domain: Any) -> None:
        try:
            domain.abortJob()
        except self.lib.libvirtError as exc:
            raise VirtError(f"cannot abort the backup job of {domain.name()}: {exc}") from None

    def agent_answers(self, domain: Any, timeout: int) -> bool:
        """True when the guest agent answers a ping within `timeout` seconds."""
        try:
            import libvirt_qemu

            libvirt_qemu.qemuAgentCommand(domain, '{"execute": "guest-ping"}', timeout, 0)
        except (ImportError, self.lib.libvirtError):
            return False
        return True

    def freeze(self, domain: Any, timeout: int) -> None:
        """Freeze the guest's filesystems through its agent (fsfreeze)."""
        try:
            domain.agentSetResponseTimeout(timeout, 0)
            domain.fsFreeze(None, 0)
        except self.lib.libvirtError as exc:
            raise VirtError(
                f"domain {domain.name()}: the guest agent could not freeze the filesystems: {exc}"
            ) from None

    def thaw(self, domain: Any) -> None:
        try:
            domain.fsThaw(None, 0)
        except self.lib.libvirtError as exc:
            raise VirtError(
                f"domain {domain.name()}: thawing the guest filesystems failed: "
                f"{exc}; check the guest now"
            ) from None

    def begin_backup(self, domain: Any, xml: str) -> None:
        """Start a push-mode backup job. Raises VirtError when libvirt refuses it."""
        try:
            domain.backupBegin(xml, None, 0)
        except self.lib.libvirtError as exc:
            raise VirtError(f"domain {domain.name()}: backup could not start: {exc}") from None

    def wait_backup(
        self, domain: Any, progress: Callable[[int], None] | None, timeout: float
    ) -> dict[str, Any]:
        """Wait for the backup job; the completed job's statistics.

        Raises VirtError when it fails, the domain stops, libvirtd goes away, or it times
        out (then the job is aborted).
        """
        name = domain.name()
        deadline = time.monotonic() + timeout
        done = 0
        while True:
            try:
                stats = domain.jobStats()
            except self.lib.libvirtError as exc:
                if not self._still_running(domain):
                    raise VirtError(
                        f"domain {name} stopped during its backup: no generation "
                        "was made; the next run backs it up (running or shut "
                        "off)"
                    ) from None
                raise VirtError(f"domain {name}: lost the backup job: {exc}") from None
            if stats.get("type", 0) == self.lib.VIR_DOMAIN_JOB_NONE:
                break
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
        return self._completed(domain, name)

    def _still_running(self, domain: Any) -> bool:
        try:
            return self.is_running(domain)
        except self.lib.libvirtError:
            return False

    def _completed(self, domain: Any, name: str) -> dict[str, Any]:
        try:
            stats = dict(domain.jobStats(self.lib.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except self.lib.libvirtError as exc:
            raise VirtError(
                f"domain {name}: backup ended without a result ({exc}); the "
                "domain stopped or libvirtd restarted"
            ) from None
        if stats.get("type") != self.lib.VIR_DOMAIN_JOB_COMPLETED:
            message = stats.get("errmsg", "no reason given")
            raise VirtError(f"domain {name}: backup failed: {message}")
        return stats
