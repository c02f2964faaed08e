"""Pure domain-XML handling of gfs_backup.tools.domainxml, on recorded and hostile XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from gfs_backup.tools.domainxml import (
    Disk,
    is_gfs_overlay,
    overlay_path,
    parse_disks,
    snapshot_xml,
    with_disk_sources,
)

ON_OVERLAY = """<domain type='qemu'><name>web01</name><devices>
  <disk type='file' device='disk'>
    <driver name='qemu' type='qcow2'/>
    <source file='/var/lib/libvirt/images/web01.qcow2.gfs-overlay-web-r7.qcow2'/>
    <backingStore type='file'><format type='raw'/>
      <source file='/var/lib/libvirt/images/web01.img'/></backingStore>
    <target dev='vda' bus='virtio'/>
  </disk>
  <disk type='block' device='disk'>
    <driver name='qemu' type='raw'/>
    <source dev='/dev/vg0/web01-data'/>
    <target dev='vdb' bus='virtio'/>
  </disk>
  <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
</devices></domain>"""


def test_overlay_names_carry_the_mark_next_to_the_disk_or_in_overlay_dir() -> None:
    beside = overlay_path("/images/a b;$(x).qcow2", None, "web", 7)
    assert beside == Path("/images/a b;$(x).qcow2.gfs-overlay-web-r7.qcow2")
    assert overlay_path("/dev/vg0/lv", Path("/var/tmp/ov"), "db", 3) == Path(
        "/var/tmp/ov/lv.gfs-overlay-db-r3.qcow2"
    )
    assert is_gfs_overlay(str(beside))
    assert not is_gfs_overlay("/images/gfs-overlay.qcow2")


def test_snapshot_xml_names_every_disk_and_overlays_only_the_chosen() -> None:
    disks = parse_disks(ON_OVERLAY)
    xml = snapshot_xml("gfs-web-r8", disks, {"vdb": Path("/ov/it's & <odd>.qcow2")})
    root = ET.fromstring(xml)
    assert root.findtext("name") == "gfs-web-r8"
    items = {d.get("name"): d for d in root.findall("./disks/disk")}
    assert items["vda"].get("snapshot") == "no"
    assert items["vdb"].get("snapshot") == "external"
    source = items["vdb"].find("source")
    assert source is not None and source.get("file") == "/ov/it's & <odd>.qcow2"


def test_with_disk_sources_points_the_definition_back_at_the_disk() -> None:
    base = Disk("vda", "/var/lib/libvirt/images/web01.img", "raw", "file")
    fixed = with_disk_sources(ON_OVERLAY, {"vda": base})
    disks = parse_disks(fixed)
    assert disks[0] == base
    assert disks[1] == Disk("vdb", "/dev/vg0/web01-data", "raw", "block")
    assert "backingStore" not in fixed
    block = Disk("vda", "/dev/vg0/web01", "raw", "block")
    assert parse_disks(with_disk_sources(ON_OVERLAY, {"vda": block}))[0] == block
