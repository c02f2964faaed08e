"""The libvirt domain XML gfs reads and writes: pure ElementTree functions, tested on
recorded and hostile XML (gfs_backup.tools.virt talks to libvirt with them)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

OVERLAY_MARK = ".gfs-overlay-"


def overlay_path(base: str, overlay_dir: Path | None, job: str, run_id: int) -> Path:
    """Where gfs puts the temporary overlay of disk `base`: next to it, or in overlay_dir.

    The name carries OVERLAY_MARK so that `gfs check` recognises a domain left on one.
    """
    folder = overlay_dir if overlay_dir is not None else Path(base).parent
    return folder / f"{Path(base).name}{OVERLAY_MARK}{job}-r{run_id}.qcow2"


def is_gfs_overlay(path: str) -> bool:
    return OVERLAY_MARK in Path(path).name


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


def snapshot_xml(name: str, all_disks: list[Disk], overlays: dict[str, Path]) -> str:
    """A disk-only <domainsnapshot>: external overlays for the disks in `overlays`, none for
    the others (every disk is named, so libvirt's defaults never decide)."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    element = ET.SubElement(root, "disks")
    for disk in all_disks:
        if disk.target in overlays:
            item = ET.SubElement(element, "disk", name=disk.target, snapshot="external")
            item.set("type", "file")
            ET.SubElement(item, "driver", type="qcow2")
            ET.SubElement(item, "source", file=str(overlays[disk.target]))
        else:
            ET.SubElement(element, "disk", name=disk.target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def with_disk_sources(domain_xml: str, sources: dict[str, Disk]) -> str:
    """The domain XML with the disks named in `sources` pointed back at those sources
    (type, path, format), and any <backingStore> of them dropped."""
    root = ET.fromstring(domain_xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") not in sources:
            continue
        wanted = sources[target.get("dev", "")]
        disk.set("type", wanted.source_type)
        for element in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(element)
        attribute = "dev" if wanted.source_type == "block" else "file"
        source = ET.Element("source", {attribute: wanted.source})
        disk.insert(list(disk).index(target) if target in list(disk) else 0, source)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", name="qemu")
        driver.set("type", wanted.format)
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
