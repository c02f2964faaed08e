"""Pure parts of restore drills: the QEMU argv from a saved domain XML, the guest-agent
protocol lines, and the policy's [drill] table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gfs_backup.core.policy import DrillSettings, parse_drill_timeout, policy_from_table
from gfs_backup.core.validate import Collector
from gfs_backup.tools.drillboot import console_tail
from gfs_backup.tools.drillvm import (
    DrillDisk,
    DrillLimits,
    DrillMachine,
    make_qemu_argv,
    memory_mib,
    parse_drill_machine,
    qemu_escape,
)
from gfs_backup.tools.guest_agent import agent_request, split_replies

pytestmark = pytest.mark.unit

HOSTILE = "/srv/vm,file=/etc/shadow $(reboot);'x\"<y>"

DOMAIN = """<domain type='qemu'>
  <name>web01,readonly=on</name>
  <memory unit='GiB'>4</memory>
  <vcpu placement='static'>8</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/boot/vmlinuz,x</kernel>
    <initrd>/boot/initrd.img</initrd>
    <cmdline>console=ttyS0 root=/dev/vda gfs.tag=a,b</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web01-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'><target dev='vdc' bus='virtio'/></disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>"""


def test_machine_from_domain_xml_keeps_boot_order_and_leaves_out_unbacked_disks() -> None:
    paths = {"vda": Path("/scratch/disk0.qcow2"), "vdb": Path("/scratch/disk1.qcow2")}
    machine = parse_drill_machine(DOMAIN, paths)
    assert machine.memory_mib == 4096
    assert machine.vcpus == 2  # capped
    assert machine.machine == "pc"
    assert machine.kernel == "/boot/vmlinuz,x"
    assert machine.cmdline == "console=ttyS0 root=/dev/vda gfs.tag=a,b"
    assert [(d.target, d.boot_index) for d in machine.disks] == [("vdb", 1), ("vda", 2)]
    assert machine.left_out == ("vdc",)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain><os><type arch='aarch64'>hvm</type></os></domain>", "x86_64 guests only"),
        ("<domain><os firmware='efi'><type>hvm</type></os></domain>", "UEFI"),
        ("<domain", "malformed"),
        (
            "<domain><memory>1</memory><os/><devices><disk device='disk'>"
            "<target dev='vda' bus='usb'/></disk></devices></domain>",
            "usb bus",
        ),
        ("<domain><memory>1048576</memory><os/><devices/></domain>", "no disk vda"),
    ],
)
def test_machines_a_drill_cannot_boot_are_refused(xml: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_drill_machine(xml, {"vda": Path("/x")})


def test_memory_units() -> None:
    import xml.etree.ElementTree as ET

    assert memory_mib(ET.fromstring("<memory>262144</memory>")) == 256  # KiB by default
    assert memory_mib(ET.fromstring("<memory unit='MiB'>512</memory>")) == 512
    assert memory_mib(ET.fromstring("<memory unit='bytes'>1073741824</memory>")) == 1024
    with pytest.raises(ValueError, match="unit"):
        memory_mib(ET.fromstring("<memory unit='parsecs'>1</memory>"))


def _argv(**machine: Any) -> tuple[str, ...]:
    base: dict[str, Any] = {
        "memory_mib": 4096,
        "vcpus": 2,
        "machine": "pc",
        "disks": (DrillDisk("vda", "virtio", Path(HOSTILE), 1),),
    }
    base.update(machine)
    limits = DrillLimits(512, "tcg", Path("/tmp/a,b/console.log"), Path("/tmp/a,b/qga.sock"))
    return make_qemu_argv(DrillMachine(**base), limits)


def test_argv_is_isolated_capped_and_in_snapshot_mode() -> None:
    argv = _argv()
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot", "-snapshot"):
        assert flag in argv
    assert argv[argv.index("-nic") + 1] == "none"
    assert argv[argv.index("-display") + 1] == "none"
    assert argv[argv.index("-m") + 1] == "512"  # min(domain 4096, cap 512)
    assert argv[argv.index("-machine") + 1] == "pc,accel=tcg"
    devices = [argv[i + 1] for i, flag in enumerate(argv) if flag == "-device"]
    assert "-netdev" not in argv and not any("net" in device for device in devices)
    assert not any(a.startswith("-kernel") for a in argv)  # boots from the disk


def test_hostile_paths_stay_one_element_and_commas_are_doubled() -> None:
    argv = _argv(kernel=HOSTILE, initrd="/b,c", cmdline="a=b,c x")
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith(f"file={HOSTILE.replace(',', ',,')},format=qcow2,")
    assert drive.split(",format=")[0].count(",,") == 1
    assert argv[argv.index("-kernel") + 1] == HOSTILE  # a plain file name, not parsed
    assert argv[argv.index("-initrd") + 1] == "/b,c"
    assert argv[argv.index("-append") + 1] == "a=b,c x"
    assert "file,id=console0,path=/tmp/a,,b/console.log" in argv
    assert "socket,id=qga0,path=/tmp/a,,b/qga.sock,server=on,wait=off" in argv
    assert "virtserialport,bus=serial0.0,chardev=qga0,name=org.qemu.guest_agent.0" in argv
    assert qemu_escape("a,,b") == "a,,,,b"


def test_disk_buses_get_their_controllers() -> None:
    disks = (
        DrillDisk("sda", "sata", Path("/a"), 1),
        DrillDisk("sdb", "scsi", Path("/b"), 2),
        DrillDisk("hda", "ide", Path("/c"), 3),
    )
    argv = _argv(disks=disks)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "ahci,id=ahci0" in devices and "virtio-scsi-pci,id=scsi0" in devices
    assert "ide-hd,bus=ahci0.0,drive=drive0,bootindex=1" in devices
    assert "scsi-hd,bus=scsi0.0,scsi-id=0,drive=drive1,bootindex=2" in devices
    assert "ide-hd,bus=ide.0,unit=0,drive=drive2,bootindex=3" in devices
    q35 = _argv(machine="q35", disks=disks[:1])
    assert "ahci,id=ahci0" not in q35 and "ide-hd,bus=ide.0,drive=drive0,bootindex=1" in q35


def test_agent_protocol_lines() -> None:
    assert agent_request("guest-ping") == b'{"execute": "guest-ping"}\n'
    assert agent_request("guest-sync", {"id": 7}) == (
        b'{"execute": "guest-sync", "arguments": {"id": 7}}\n'
    )
    replies, rest = split_replies(b'garbage\n\xff{"return": 7}\n{"return": {}}\n{"ret')
    assert replies == [{"return": 7}, {"return": {}}]
    assert rest == b'{"ret'


def test_console_tail_is_at_most_2_kib() -> None:
    assert console_tail("x" * 5000 + "END").endswith("END")
    assert len(console_tail("é" * 5000).encode()) <= 2048


def _drill_policy(drill: dict[str, Any]) -> tuple[DrillSettings, list[str]]:
    collector = Collector("p.toml")
    table = {"retention": {"sons": 1}, "drill": drill}
    policy = policy_from_table(table, "p", collector)
    return policy.drill, [str(problem) for problem in collector.problems]


def test_drill_settings_defaults_and_values() -> None:
    settings, problems = _drill_policy({})
    assert problems == []
    assert settings == DrillSettings()
    assert settings.console_pattern == "login:" and settings.describe() == "console /login:/"
    settings, problems = _drill_policy(
        {
            "schedule": "monthly",
            "select": "grandfather",
            "console": "GFS-GUEST-UP",
            "agent": True,
            "timeout": "2m",
            "memory": 256,
            "accel": "kvm",
        }
    )
    assert problems == []
    assert settings == DrillSettings("grandfather", "GFS-GUEST-UP", True, 120.0, 256, "kvm")
    assert settings.describe() == "console /GFS-GUEST-UP/ + agent ping"
    agent_only, _ = _drill_policy({"agent": True})
    assert agent_only.console_pattern is None and agent_only.describe() == "agent ping"


def test_drill_settings_problems_are_all_reported_with_their_keys() -> None:
    _, problems = _drill_policy(
        {
            "select": "oldest",
            "console": "(",
            "agent": "yes",
            "timeout": "5 weeks",
            "memory": 8,
            "accel": "xen",
            "network": True,
            "commands": [["pg_isready"], "systemctl is-active db", []],
            "ports": [22, 70000],
        }
    )
    joined = "\n".join(problems)
    assert "p.toml: drill.network: unknown key" in joined
    assert "p.toml: drill.select: unknown value 'oldest' (allowed: newest, son" in joined
    assert "p.toml: drill.console: not a valid regular expression" in joined
    assert "p.toml: drill.agent: expected true or false" in joined
    assert "p.toml: drill.timeout: expected seconds or a duration" in joined
    assert "p.toml: drill.memory: 8 MiB is not allowed" in joined
    assert "p.toml: drill.accel: unknown value 'xen' (allowed: auto, tcg, kvm)" in joined
    assert "p.toml: drill.commands[1]: expected a non-empty list of strings" in joined
    assert "p.toml: drill.commands[2]: expected a non-empty list of strings" in joined
    assert "p.toml: drill.ports: expected a list of TCP port numbers (1-65535)" in joined
    assert len(problems) == 10


@pytest.mark.parametrize(
    ("value", "seconds"), [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0)]
)
def test_drill_timeouts(value: object, seconds: float) -> None:
    assert parse_drill_timeout(value) == seconds


@pytest.mark.parametrize("value", [5, "2d", True, "-1m", 100000])
def test_bad_drill_timeouts(value: object) -> None:
    with pytest.raises(ValueError):
        parse_drill_timeout(value)
