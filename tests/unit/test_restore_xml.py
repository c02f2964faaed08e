"""restore_xml: a restored domain gets its own paths and identities, so it can start beside
the original (pure XML, no libvirt)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gfs_backup.tools.domainxml import nvram_path, restore_xml

pytestmark = pytest.mark.unit

# The inactive XML of a domain with every per-domain path or identity libvirt 9 can hold.
NVRAM = "/var/lib/libvirt/qemu/nvram/web01_VARS.fd"
ORIGINAL = f"""<domain type='kvm'>
  <name>web01</name>
  <uuid>0f8fad5b-d9cb-469f-a165-70867728950e</uuid>
  <title>Web server</title>
  <description>production web, owner ops</description>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90e</genid>
  <sysinfo type='smbios'><system>
    <entry name='manufacturer'>ACME</entry>
    <entry name='uuid'>0f8fad5b-d9cb-469f-a165-70867728950e</entry>
  </system></sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{NVRAM}</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web01-scratch.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/>
      <source bridge='br0'/>
      <target dev='vnet7'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/web01-serial.log'/>
      <target port='0'/>
    </serial>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/web01-serial1.log' append='on'/>
      <target port='1'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='/run/web01/console.sock'/>
      <target port='2'/>
    </serial>
    <console type='file'>
      <source path='/var/log/web01-serial.log'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web01.org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <graphics type='vnc' port='5907' autoport='no' websocket='5707' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type='spice' autoport='yes'>
      <listen type='socket' socket='/run/web01/spice.sock'/>
    </graphics>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source>
    </hostdev>
  </devices>
</domain>
"""
DIR = Path("/srv/restore/web01-test")
DISKS = {"vda": DIR / "web01-test-vda.qcow2"}
ORIGIN = "domain web01, generation 20261201T010000Z"


def restored(keep_interfaces: bool = False) -> tuple[ET.Element, list[str], list[object]]:
    result = restore_xml(ORIGINAL, "web01-test", DISKS, keep_interfaces, DIR, ORIGIN)
    return ET.fromstring(result.xml), result.rewritten, list(result.copies)


def paths_in(root: ET.Element) -> set[str]:
    """Every file or socket path the definition names."""
    found = {element.text or "" for element in root.iter() if element.tag in ("loader", "nvram")}
    for element in root.iter():
        found.update(element.get(key, "") for key in ("path", "file", "socket"))
    return found - {""}


def test_no_path_of_the_original_is_left_but_read_only_firmware() -> None:
    root, _lines, _copies = restored()

    original = paths_in(ET.fromstring(ORIGINAL)) - {"/usr/share/OVMF/OVMF_CODE_4M.fd"}
    left = paths_in(root) & original
    assert left == set()
    assert root.findtext("./os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"  # shared, r/o


def test_logs_and_files_go_to_the_restore_directory_once_each() -> None:
    root, lines, _copies = restored()
    devices = root.find("devices")
    assert devices is not None

    serial0 = devices.findall("serial")[0].find("source")
    console = devices.find("console/source")
    assert serial0 is not None and console is not None
    assert serial0.get("path") == str(DIR / "web01-test-serial0.log")
    assert console.get("path") == serial0.get("path")  # the console mirrors serial 0
    log = devices.find("serial/log")
    assert log is not None and log.get("file") == str(DIR / "web01-test-serial1-log.log")
    unix = devices.findall("serial")[2].find("source")
    assert unix is not None and unix.get("path") == str(DIR / "web01-test-serial2.sock")
    assert any("serial0: /var/log/web01-serial.log ->" in line for line in lines)


def test_the_agent_channel_gets_a_socket_libvirt_chooses() -> None:
    root, lines, _copies = restored()
    channel = root.find("devices/channel")
    assert channel is not None and channel.find("source") is None
    assert channel.find("target") is not None  # the guest agent stays
    assert any("channel0: unix socket path left to libvirt" in line for line in lines)


def test_the_nvram_is_copied_into_the_restore_directory() -> None:
    root, _lines, copies = restored()
    nvram = root.find("os/nvram")
    assert nvram is not None and nvram.text == str(DIR / "web01-test-VARS.fd")
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert copies == [("nvram", DIR / "web01-test-VARS.fd", NVRAM)]
    assert nvram_path(ORIGINAL) == NVRAM


def test_displays_tpm_host_devices_and_identity() -> None:
    root, lines, _copies = restored()
    vnc, spice = root.findall("devices/graphics")
    assert ("port" in vnc.attrib, "websocket" in vnc.attrib, vnc.get("autoport")) == (
        False,
        False,
        "yes",
    )
    assert vnc.get("listen") == "127.0.0.1"
    listen = spice.find("listen")
    assert listen is not None and "socket" not in listen.attrib
    assert [tpm.get("model") for tpm in root.findall("devices/tpm")] == ["tpm-crb"]
    assert root.find("devices/hostdev") is None
    assert root.find("uuid") is None and root.findtext("genid") == ""  # libvirt makes one
    assert [e.get("name") for e in root.findall("sysinfo/system/entry")] == ["manufacturer"]
    assert root.findtext("title") == f"web01-test: restored by gfs from {ORIGIN}"
    assert root.findtext("description") == (
        f"Restored by gfs from {ORIGIN}.\n\nproduction web, owner ops"
    )
    assert any("TPM emulator: new, empty state" in line for line in lines)


def test_disks_interfaces_and_macs() -> None:
    root, _lines, _copies = restored()
    assert [d.find("source").get("file") for d in root.findall("devices/disk")] == [  # type: ignore[union-attr]
        str(DISKS["vda"])
    ]
    assert root.find("devices/interface") is None
    kept, lines, _copies = restored(keep_interfaces=True)
    interface = kept.find("devices/interface")
    assert interface is not None
    assert interface.find("mac") is None and interface.find("target") is None
    assert interface.find("source") is not None
    assert any("MAC address and tap device left to libvirt" in line for line in lines)


def test_a_socket_path_too_long_for_a_unix_socket_is_refused() -> None:
    deep = Path("/srv/" + "d" * 120)
    with pytest.raises(ValueError, match="longer than a unix socket path may be"):
        restore_xml(ORIGINAL, "web01-test", DISKS, False, deep, ORIGIN)
