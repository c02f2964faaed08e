"""The libvirt domain XML gfs reads and writes: pure ElementTree functions, tested on
recorded and hostile XML (gfs_backup.tools.virt talks to libvirt with them)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

OVERLAY_MARK = ".gfs-overlay-"
# gfs's element in a domain's <metadata> (`virsh metadata DOMAIN GFS_NAMESPACE --key gfs
# --set '<gfs backup="no"/>' --config`): backup="no" keeps the domain out of `domains`
# patterns; restored-from="JOB GENERATION" marks a domain `gfs restore --as-domain` made.
GFS_NAMESPACE = "https://gfs-backup.dev/xmlns/domain/1"
ET.register_namespace("gfs", GFS_NAMESPACE)


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


def gfs_metadata(domain_xml: str) -> dict[str, str]:
    """The attributes of gfs's element in the domain's <metadata> ({} when none)."""
    root = ET.fromstring(domain_xml)
    element = root.find(f"./metadata/{{{GFS_NAMESPACE}}}gfs")
    return dict(element.attrib) if element is not None else {}


def opted_out(domain_xml: str) -> bool:
    """The domain asks not to be backed up by `domains` patterns (backup="no")."""
    return gfs_metadata(domain_xml).get("backup", "").lower() in ("no", "false", "0", "off")


def skipped_disks(domain_xml: str) -> list[tuple[str, str]]:
    """(target, why) of the domain's devices a VM backup leaves out by default: cdroms and
    floppies (installation media), `lun` pass-through, shareable disks (a cluster disk
    another domain writes: no point in time), and network disks (no file to read)."""
    root = ET.fromstring(domain_xml)
    skipped = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        name = target.get("dev", "?") if target is not None else "?"
        device = disk.get("device", "disk")
        if device != "disk":
            skipped.append((name, f"a {device}"))
        elif disk.find("shareable") is not None:
            skipped.append((name, "shareable (written by other domains too)"))
        elif disk.get("type") == "network":
            source = disk.find("source")
            protocol = source.get("protocol", "") if source is not None else ""
            skipped.append((name, f"a {protocol} network disk" if protocol else "a network disk"))
        elif disk.find("source") is None:
            skipped.append((name, "no medium"))
    return skipped


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


def pull_backup_xml(
    disks: list[Disk], all_disks: list[Disk], socket: Path, scratch: Path, incremental: str | None
) -> str:
    """A pull-mode <domainbackup>: libvirt's NBD server on the unix `socket` exports each of
    `disks` (export name = target) frozen at the job's start, with a copy-before-write
    scratch file in `scratch`; `incremental` names the checkpoint whose changes it marks
    dirty (None: a full backup). Every other disk of the domain is named backup='no'."""
    root = ET.Element("domainbackup", mode="pull")
    if incremental is not None:
        ET.SubElement(root, "incremental").text = incremental
    ET.SubElement(root, "server", transport="unix", socket=str(socket))
    element = ET.SubElement(root, "disks")
    wanted = {disk.target for disk in disks}
    for disk in all_disks:
        if disk.target in wanted:
            item = ET.SubElement(element, "disk", name=disk.target, backup="yes", type="file")
            ET.SubElement(item, "scratch", file=str(scratch / f"{disk.target}.scratch.qcow2"))
        else:
            ET.SubElement(element, "disk", name=disk.target, backup="no")
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, disks: list[Disk], all_disks: list[Disk]) -> str:
    """A <domaincheckpoint> `name` with a bitmap in each of `disks` (qcow2), none in others."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = "gfs-backup: changed blocks since this backup"
    element = ET.SubElement(root, "disks")
    wanted = {disk.target for disk in disks}
    for disk in all_disks:
        mode = "bitmap" if disk.target in wanted else "no"
        ET.SubElement(element, "disk", name=disk.target, checkpoint=mode)
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


def nvram_path(domain_xml: str) -> str | None:
    """The domain's UEFI variable store file (`<os><nvram>`), if it has one."""
    nvram = ET.fromstring(domain_xml).find("./os/nvram")
    return nvram.text if nvram is not None and nvram.text else None


UNIX_PATH_MAX = 107  # bytes of a unix socket path (sun_path, without the NUL)
CHARDEVS = ("serial", "console", "parallel", "channel")


@dataclass(frozen=True)
class RestoredDomain:
    """`restore_xml`'s result: the new definition, what was rewritten (one line each, for
    the log), and the per-domain files to put at new paths: (what, new path, old path)."""

    xml: str
    rewritten: list[str]
    copies: list[tuple[str, Path, str]]


def restore_xml(
    domain_xml: str,
    name: str,
    disk_paths: dict[str, Path],
    keep_interfaces: bool,
    folder: Path,
    origin: str,
) -> RestoredDomain:
    """The saved domain XML as a new domain that can run beside the original: new name, no
    UUID, disks at new qcow2 paths, and every per-domain path or identity made its own.

    Serial/console/parallel/channel log files and file sources go to `folder` (one new
    path per old one: a console mirroring serial 0 keeps sharing it); unix sockets too,
    except a named virtio channel's (the guest agent's), whose path libvirt assigns per
    domain; the NVRAM (and a writable loader) is to be copied into `folder`; VNC/SPICE
    ports and sockets are left to libvirt; a TPM emulator gets new state (it is kept by
    UUID), a passed-through TPM and host devices are removed (the original holds them);
    with `keep_interfaces` the MAC addresses and tap names are left to libvirt; title and
    description say where the domain came from (`origin`). ValueError if a new socket
    path is too long for a unix socket.
    """
    root = ET.fromstring(domain_xml)
    rename = _Renamer(folder, name)
    root.find("name").text = name  # type: ignore[union-attr]
    for element in root.findall("uuid"):
        root.remove(element)
    _describe_origin(root, name, origin)
    _mark_restored(root, origin)
    _drop_identity(root, rename)
    devices = root.find("devices")
    assert devices is not None
    _set_disks(devices, disk_paths)
    _own_chardevs(devices, rename)
    _own_firmware(root, rename)
    _own_displays(devices, rename)
    _own_tpm_and_host_devices(devices, rename)
    if keep_interfaces:
        _new_interface_identities(devices, rename)
    else:
        for interface in devices.findall("interface"):
            devices.remove(interface)
    return RestoredDomain(ET.tostring(root, encoding="unicode"), rename.lines, rename.copies)


class _Renamer:
    """New per-domain paths in `folder`, the same new path for the same old one."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.paths: dict[str, Path] = {}
        self.lines: list[str] = []
        self.copies: list[tuple[str, Path, str]] = []

    def new_path(self, old: str, what: str, suffix: str) -> Path:
        if old not in self.paths:
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.name)
            self.paths[old] = self.folder / f"{safe}-{what}{suffix}"
            self.lines.append(f"{what}: {old} -> {self.paths[old]}")
        return self.paths[old]

    def note(self, line: str) -> None:
        self.lines.append(line)


def _describe_origin(root: ET.Element, name: str, origin: str) -> None:
    title = root.find("title")
    if title is None:
        title = ET.SubElement(root, "title")
    title.text = f"{name}: restored by gfs from {origin}"
    description = root.find("description")
    before = description.text if description is not None and description.text else ""
    if description is None:
        description = ET.SubElement(root, "description")
    description.text = f"Restored by gfs from {origin}." + (f"\n\n{before}" if before else "")


def _mark_restored(root: ET.Element, origin: str) -> None:
    """gfs's metadata element says where the domain came from: `domains` patterns leave it
    out (unless the job says include_restored)."""
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    element = metadata.find(f"{{{GFS_NAMESPACE}}}gfs")
    if element is None:
        element = ET.SubElement(metadata, f"{{{GFS_NAMESPACE}}}gfs")
    element.set("restored-from", origin)


def _drop_identity(root: ET.Element, rename: _Renamer) -> None:
    """The SMBIOS UUID (must equal the new domain's) and the VM generation ID."""
    for system in root.findall("./sysinfo/system"):
        for entry in system.findall("entry"):
            if entry.get("name") == "uuid":
                system.remove(entry)
                rename.note("SMBIOS uuid entry removed (the new domain's UUID is used)")
    for genid in root.findall("genid"):
        if genid.text:
            genid.text = None
            rename.note("VM generation ID left to libvirt (a new one)")


def _set_disks(devices: ET.Element, disk_paths: dict[str, Path]) -> None:
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
        driver.set("type", "raw" if disk_paths[target.get("dev", "")].suffix == ".raw" else "qcow2")
        for stale in disk.findall("backingStore"):
            disk.remove(stale)


def _own_chardevs(devices: ET.Element, rename: _Renamer) -> None:
    for tag in CHARDEVS:
        for index, device in enumerate(devices.findall(tag)):
            what = f"{tag}{index}"
            for log in device.findall("log"):
                if log.get("file"):
                    new = rename.new_path(log.get("file", ""), f"{what}-log", ".log")
                    log.set("file", str(new))
            for source in device.findall("source"):
                _own_chardev_source(device, source, what, rename)


def _own_chardev_source(
    device: ET.Element, source: ET.Element, what: str, rename: _Renamer
) -> None:
    kind, path = device.get("type"), source.get("path")
    if kind == "file" and path:
        source.set("path", str(rename.new_path(path, what, ".log")))
    elif kind == "unix" and _named_virtio_channel(device):
        device.remove(source)  # libvirt assigns a per-domain path
        rename.note(f"{what}: unix socket path left to libvirt (was {path or 'its own'})")
    elif kind == "unix" and path:
        new = rename.new_path(path, what, ".sock")
        if len(str(new).encode()) > UNIX_PATH_MAX:
            raise ValueError(
                f"{what}: the new socket path {new} is longer than a unix socket path may "
                f"be ({UNIX_PATH_MAX} bytes): restore to a shorter --to"
            )
        source.set("path", str(new))
    elif kind == "pty" and path:
        del source.attrib["path"]


def _named_virtio_channel(device: ET.Element) -> bool:
    target = device.find("target")
    return device.tag == "channel" and target is not None and bool(target.get("name"))


def _own_firmware(root: ET.Element, rename: _Renamer) -> None:
    """NVRAM (UEFI variables) and a writable loader are per domain: copies in `folder`."""
    os_element = root.find("os")
    if os_element is None:
        return
    nvram = os_element.find("nvram")
    if nvram is not None and nvram.text:
        new = rename.new_path(nvram.text, "VARS", ".fd")
        rename.copies.append(("nvram", new, nvram.text))
        nvram.text = str(new)
    loader = os_element.find("loader")
    if loader is not None and loader.text and loader.get("readonly") == "no":
        new = rename.new_path(loader.text, "loader", ".fd")
        rename.copies.append(("loader", new, loader.text))
        loader.text = str(new)


def _own_displays(devices: ET.Element, rename: _Renamer) -> None:
    for graphics in devices.findall("graphics"):
        kind = graphics.get("type", "?")
        fixed = [key for key in ("port", "tlsPort", "websocket") if key in graphics.attrib]
        for key in fixed:
            del graphics.attrib[key]
        if fixed or graphics.get("autoport") == "no":
            graphics.set("autoport", "yes")
            rename.note(f"{kind} display: port chosen by libvirt (was {', '.join(fixed)})")
        sockets = [graphics, *graphics.findall("listen")]
        for element in sockets:
            if element.get("socket"):
                rename.note(f"{kind} display: socket left to libvirt (was {element.get('socket')})")
                del element.attrib["socket"]


def _own_tpm_and_host_devices(devices: ET.Element, rename: _Renamer) -> None:
    for tpm in devices.findall("tpm"):
        backend = tpm.find("backend")
        if backend is not None and backend.get("type") == "passthrough":
            devices.remove(tpm)
            rename.note("TPM passthrough removed (the original holds the host's TPM)")
        elif backend is not None and backend.get("type") == "emulator":
            rename.note("TPM emulator: new, empty state (its state is kept by domain UUID)")
    for hostdev in devices.findall("hostdev"):
        devices.remove(hostdev)
        rename.note("host device passthrough removed (the original holds the device)")


def _new_interface_identities(devices: ET.Element, rename: _Renamer) -> None:
    for index, interface in enumerate(devices.findall("interface")):
        for tag in ("mac", "target", "alias"):
            for element in interface.findall(tag):
                interface.remove(element)
        rename.note(f"interface {index}: MAC address and tap device left to libvirt (new)")
