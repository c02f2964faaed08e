"""The isolated QEMU of a restore drill, as pure functions: the saved domain XML in, argv out.

A drill never goes through libvirt: it boots a plain `qemu-system-x86_64` from the restored
disk copies, so it cannot touch the original domain, its name or its network. The machine
has no network device (`-nodefaults -nic none`), no display, memory capped, one or two vCPUs,
every disk in snapshot mode (writes go to a temporary overlay, never to the copies) and the
first serial port in a file. Direct kernel boot (`<kernel>/<initrd>/<cmdline>`) is kept when
the domain uses it; otherwise the BIOS boots the disks in XML (or `<boot order>`) order.

Values are separate argv elements; inside QEMU's `key=value,...` option strings every comma
of a value is doubled (`file=a,,b`), so a hostile path can never add an option.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
AGENT_PORT = "org.qemu.guest_agent.0"
MAX_VCPUS = 2
BUSES = ("virtio", "sata", "scsi", "ide")
_UNITS = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 1000**2,
    "m": 1024**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "g": 1024**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "t": 1024**4,
    "tib": 1024**4,
}


@dataclass(frozen=True)
class DrillDisk:
    """A restored disk: its target name (vda), bus, copy and BIOS boot position."""

    target: str
    bus: str
    path: Path
    boot_index: int


@dataclass(frozen=True)
class DrillMachine:
    """What the drill boots, read from the saved domain XML."""

    memory_mib: int
    vcpus: int
    machine: str  # pc | q35
    disks: tuple[DrillDisk, ...]
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    left_out: tuple[str, ...] = ()  # disks of the domain that are not in the generation


@dataclass(frozen=True)
class DrillLimits:
    """The drill's own settings: memory cap, accelerator and the files in the scratch dir."""

    memory_cap_mib: int
    accel: str  # tcg | kvm
    console: Path
    agent_socket: Path | None = None
    name: str = "gfs-drill"
    # (guest port, host port): a restricted user-mode network (the guest reaches nothing,
    # 127.0.0.1:host port reaches the guest's port); none: no network device at all.
    forwards: tuple[tuple[int, int], ...] = ()
    monitor: Path | None = None  # a QMP socket (the port probes ask QEMU's network state)


def qemu_escape(value: str) -> str:
    """A value for a QEMU `key=value,...` option string: commas doubled."""
    return value.replace(",", ",,")


def memory_mib(element: ET.Element | None) -> int:
    """A libvirt <memory unit=...> element in MiB (libvirt's default unit is KiB)."""
    if element is None or not (element.text or "").strip():
        raise ValueError("the domain XML has no <memory>")
    unit = element.get("unit", "KiB").lower()
    if unit not in _UNITS:
        raise ValueError(f"the domain XML has an unknown memory unit {unit!r}")
    try:
        amount = int((element.text or "").strip())
    except ValueError:
        raise ValueError(f"the domain XML has a malformed <memory> {element.text!r}") from None
    return max(1, amount * _UNITS[unit] // (1 << 20))


def parse_drill_machine(domain_xml: str, disk_paths: dict[str, Path]) -> DrillMachine:
    """The machine to boot from the saved XML, with the disks at `disk_paths` (by target).

    Raises ValueError for what a drill cannot boot: not x86_64, UEFI firmware, a disk bus
    other than virtio/sata/scsi/ide, or none of the restored disks in the XML.
    """
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise ValueError(f"the saved domain XML is malformed: {exc}") from None
    os_element = root.find("os")
    if os_element is None:
        raise ValueError("the domain XML has no <os> element")
    os_type = os_element.find("type")
    arch = os_type.get("arch", "x86_64") if os_type is not None else "x86_64"
    if arch != "x86_64":
        raise ValueError(f"drills boot x86_64 guests only; this domain is {arch}")
    if os_element.find("loader") is not None or os_element.get("firmware") == "efi":
        raise ValueError("the domain boots UEFI firmware (<loader>): drills boot BIOS guests")
    machine_type = os_type.get("machine", "pc") if os_type is not None else "pc"
    vcpu_text = (root.findtext("vcpu") or "1").strip()
    vcpus = min(MAX_VCPUS, max(1, int(vcpu_text) if vcpu_text.isdigit() else 1))
    disks, left_out = _disks(root, disk_paths)
    return DrillMachine(
        memory_mib=memory_mib(root.find("memory")),
        vcpus=vcpus,
        machine="q35" if "q35" in machine_type else "pc",
        disks=disks,
        kernel=_text(os_element, "kernel"),
        initrd=_text(os_element, "initrd"),
        cmdline=os_element.findtext("cmdline"),
        left_out=left_out,
    )


def _text(parent: ET.Element, tag: str) -> str | None:
    text = (parent.findtext(tag) or "").strip()
    return text or None


def _disks(
    root: ET.Element, disk_paths: dict[str, Path]
) -> tuple[tuple[DrillDisk, ...], tuple[str, ...]]:
    found: list[tuple[int, int, str, str]] = []  # (explicit order or big, position, target, bus)
    left_out = []
    for position, disk in enumerate(root.findall("./devices/disk")):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        name = target.get("dev", "") if target is not None else ""
        if name not in disk_paths:
            left_out.append(name or f"disk #{position}")
            continue
        bus = target.get("bus", "virtio") if target is not None else "virtio"
        if bus not in BUSES:
            raise ValueError(f"disk {name} is on a {bus} bus: drills attach {', '.join(BUSES)}")
        boot = disk.find("boot")
        order_text = boot.get("order", "") if boot is not None else ""
        order = int(order_text) if order_text.isdigit() else 1 << 30
        found.append((order, position, name, bus))
    missing = sorted(set(disk_paths) - {item[2] for item in found})
    if missing:
        raise ValueError(f"the domain XML has no disk {', '.join(missing)} of the generation")
    if not found:
        raise ValueError("the generation has no disk to boot")
    ordered = sorted(found)
    disks = tuple(
        DrillDisk(name, bus, disk_paths[name], index + 1)
        for index, (_order, _position, name, bus) in enumerate(ordered)
    )
    return disks, tuple(left_out)


def make_qemu_argv(machine: DrillMachine, limits: DrillLimits) -> tuple[str, ...]:
    """The argv of the drill's QEMU: isolated, snapshot mode, serial console to a file."""
    memory = min(machine.memory_mib, limits.memory_cap_mib)
    argv: list[str] = [
        QEMU,
        "-name",
        f"guest={qemu_escape(limits.name)}",
        "-machine",
        f"{machine.machine},accel={limits.accel}",
        "-m",
        str(memory),
        "-smp",
        str(machine.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-nic",
        _nic(limits.forwards),
        "-display",
        "none",
        "-vga",
        "none",
        "-no-reboot",
        "-snapshot",
        "-rtc",
        "base=utc",
        "-chardev",
        f"file,id=console0,path={qemu_escape(str(limits.console))}",
        "-serial",
        "chardev:console0",
    ]
    if machine.kernel is not None:
        argv += ["-kernel", machine.kernel]  # a plain file name: no option parsing
        if machine.initrd is not None:
            argv += ["-initrd", machine.initrd]
        if machine.cmdline is not None:
            argv += ["-append", machine.cmdline]
    argv += _disk_args(machine)
    if limits.monitor is not None:
        argv += ["-qmp", f"unix:{qemu_escape(str(limits.monitor))},server=on,wait=off"]
    if limits.agent_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=qga0,path={qemu_escape(str(limits.agent_socket))},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=serial0",
            "-device",
            f"virtserialport,bus=serial0.0,chardev=qga0,name={AGENT_PORT}",
        ]
    return tuple(argv)


def _nic(forwards: tuple[tuple[int, int], ...]) -> str:
    """`none`, or user-mode networking with `restrict=on` (no route out of the guest, not
    even to the host) and a host-side forward on 127.0.0.1 for each probed guest port."""
    if not forwards:
        return "none"
    rules = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in forwards)
    return f"user,model=virtio-net-pci,restrict=on{rules}"


def _disk_args(machine: DrillMachine) -> list[str]:
    argv: list[str] = []
    buses = {disk.bus for disk in machine.disks}
    if "sata" in buses and machine.machine != "q35":  # q35 has its own AHCI as ide.N
        argv += ["-device", "ahci,id=ahci0"]
    if "scsi" in buses:
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    counters = {bus: 0 for bus in BUSES}
    for index, disk in enumerate(machine.disks):
        drive = f"drive{index}"  # our own ids: target names from the XML never become ids
        argv += [
            "-drive",
            f"file={qemu_escape(str(disk.path))},format={_format(disk.path)},if=none,id={drive},"
            "snapshot=on,discard=unmap",
        ]
        unit = counters[disk.bus]
        counters[disk.bus] += 1
        device = {
            "virtio": "virtio-blk-pci",
            "scsi": f"scsi-hd,bus=scsi0.0,scsi-id={unit}",
            "ide": f"ide-hd,bus=ide.{unit // 2},unit={unit % 2}",
            "sata": f"ide-hd,bus={'ide' if machine.machine == 'q35' else 'ahci0'}.{unit}",
        }[disk.bus]
        argv += ["-device", f"{device},drive={drive},bootindex={disk.boot_index}"]
    return argv


def _format(path: Path) -> str:
    return "raw" if path.suffix == ".raw" else "qcow2"
