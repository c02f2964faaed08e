"""Pure parts of the lab: parsers of recorded tool output, the guest command line, domain XML,
the remote-host guest's QEMU command line, init script and QMP replies."""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.lab.daemons import LabState, LibvirtDaemons, ProcessRecord, process_record
from tests.lab.domains import DomainSpec, domain_xml
from tests.lab.errors import LabError
from tests.lab.guest import (
    PATTERN_SIZE,
    GuestImage,
    guest_cmdline,
    parse_ldd,
    parse_show_depends,
    pattern_bytes,
)
from tests.lab.remote_host import QemuSpec, known_hosts_line, qemu_argv, qmp_reply
from tests.lab.remote_image import (
    NFS_EXPORT,
    NFS_MOUNT,
    NFS_MOUNT_OPTIONS,
    NFS_SERIAL,
    NFSD_START,
    PV_SERIAL,
    READY_MARKER,
    THIN_POOL,
    VG_NAME,
    RemoteHostImage,
    SshKeys,
    init_script,
    links_to,
)

pytestmark = pytest.mark.unit

LDD_QEMU_GA = """\
\tlinux-vdso.so.1 (0x00007fa6ec724000)
\tlibudev.so.1 => /lib/x86_64-linux-gnu/libudev.so.1 (0x00007fa6ec5ed000)
\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007fa6ec4a1000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fa6ec1d7000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007fa6ec726000)
"""

MODULES = "/c/kernel/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers"
SHOW_DEPENDS_VIRTIO_BLK = (  # as modprobe prints it: each insmod line ends with a space
    f"insmod {MODULES}/virtio/virtio_ring.ko \n"
    f"insmod {MODULES}/virtio/virtio.ko \n"
    "builtin crc32c\n"
    f"insmod {MODULES}/block/virtio_blk.ko \n"
)

IMAGE = GuestImage(Path("/k/vmlinuz"), Path("/k/initrd.gz"), "6.1.0-56-cloud-amd64", True)


def test_parse_ldd_finds_libraries_and_the_loader_but_not_the_vdso() -> None:
    assert parse_ldd(LDD_QEMU_GA) == [
        Path("/lib/x86_64-linux-gnu/libudev.so.1"),
        Path("/lib/x86_64-linux-gnu/libglib-2.0.so.0"),
        Path("/lib/x86_64-linux-gnu/libc.so.6"),
        Path("/lib64/ld-linux-x86-64.so.2"),
    ]


def test_parse_show_depends_keeps_load_order_and_skips_builtins() -> None:
    names = [Path(path).name for path in parse_show_depends(SHOW_DEPENDS_VIRTIO_BLK)]
    assert names == ["virtio_ring.ko", "virtio.ko", "virtio_blk.ko"]


def test_guest_cmdline_carries_the_protocol_words() -> None:
    line = guest_cmdline("check-pattern", tag="gen2", agent=True, layout="fs")
    assert line.split() == [
        "console=ttyS0",
        "panic=1",
        "quiet",
        "gfs.action=check-pattern",
        "gfs.tag=gen2",
        "gfs.agent=1",
        "gfs.layout=fs",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [{"action": "reboot"}, {"layout": "lvm"}, {"tag": "two words"}, {"after": "x;poweroff"}],
)
def test_guest_cmdline_refuses_unknown_or_unsafe_values(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        guest_cmdline(**kwargs)  # type: ignore[arg-type]


def test_pattern_is_deterministic_and_of_the_documented_size() -> None:
    assert pattern_bytes() == pattern_bytes()
    assert len(pattern_bytes()) == PATTERN_SIZE


def test_domain_xml_is_a_tcg_domain_with_kernel_boot_disk_and_console_file() -> None:
    spec = DomainSpec(
        name="gfs-test-1-abcdef-1",
        image=IMAGE,
        disk=Path("/tmp/it's <here>/disk.qcow2"),
        console_log=Path("/tmp/console.log"),
        cmdline=guest_cmdline("idle"),
        agent=True,
    )
    root = ET.fromstring(domain_xml(spec))

    def attribute(path: str, name: str) -> str | None:
        element = root.find(path)
        assert element is not None, path
        return element.get(name)

    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == "/k/vmlinuz"
    assert root.findtext("os/cmdline") == guest_cmdline("idle")
    assert attribute("devices/disk/source", "file") == str(spec.disk)
    assert attribute("devices/serial/source", "path") == "/tmp/console.log"
    assert attribute("devices/channel/target", "name") == "org.qemu.guest_agent.0"


def test_lab_state_forgets_processes_that_are_gone() -> None:
    me = process_record("pytest", os.getpid())
    assert me is not None
    gone = ProcessRecord("libvirtd", me.pid, me.starttime + 1)  # same PID, other process
    state = LabState(users=[me, gone], daemons=[gone])
    state.prune()
    assert (state.users, state.daemons) == ([me], [])


def test_only_a_libvirtd_this_session_started_and_alone_uses_may_be_restarted() -> None:
    me = process_record("pytest", os.getpid())
    other_session = process_record("pytest", 1)
    assert me is not None and other_session is not None
    child = subprocess.Popen(["sleep", "60"])  # stands in for a libvirtd we started
    try:
        ours = process_record("libvirtd", child.pid)
        assert ours is not None
        daemons = LibvirtDaemons("qemu:///system", Path("/nonexistent"), me)
        assert daemons._own_libvirtd(LabState(users=[me, me], daemons=[ours])) == ours
        with pytest.raises(LabError, match=r"also used by pytest session\(s\) 1: restarting"):
            daemons._own_libvirtd(LabState(users=[me, other_session], daemons=[ours]))
        theirs = LabState(users=[me], daemons=[ProcessRecord("libvirtd", 1, 0)])
        with pytest.raises(LabError, match="libvirtd PID 1 was started by PID 0"):
            daemons._own_libvirtd(theirs)
        with pytest.raises(LabError, match="was not started by the lab"):
            daemons._own_libvirtd(LabState(users=[me]))
    finally:
        child.kill()
        child.wait()


REMOTE_IMAGE = RemoteHostImage(
    Path("/k/vmlinuz"),
    Path("/k/remote.gz"),
    "6.1.0-56-cloud-amd64",
    SshKeys(Path("/k/host"), "ssh-ed25519 AAAAhost", Path("/k/client"), "ssh-ed25519 AAAAclient"),
)


def remote_spec(directory: str = "/run/lab") -> QemuSpec:
    base = Path(directory)
    return QemuSpec(
        name="gfs-remote-1-abcdef12",
        image=REMOTE_IMAGE,
        pv_disk=base / "pv.qcow2",
        nfs_disk=base / "nfs.qcow2",
        port=40022,
        console_log=base / "console.log",
        qmp_socket=base / "qmp.sock",
        pidfile=base / "qemu.pid",
    )


def option(argv: list[str], name: str) -> list[str]:
    """Every value given to the QEMU option `name` in `argv`."""
    return [argv[index + 1] for index, word in enumerate(argv) if word == name]


def test_remote_qemu_argv_is_tcg_with_loopback_only_forwarding_and_both_disks() -> None:
    argv = qemu_argv(remote_spec())
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-netdev") == ["user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22"]
    assert option(argv, "-device")[0] == "virtio-net-pci,netdev=net0,id=nic0,vectors=0"
    assert option(argv, "-device")[1:] == [
        f"virtio-blk-pci,drive=pv,serial={PV_SERIAL},vectors=0",
        f"virtio-blk-pci,drive=nfs,serial={NFS_SERIAL},vectors=0",
    ]
    assert "file.filename=/run/lab/pv.qcow2" in option(argv, "-blockdev")[0]
    assert option(argv, "-serial") == ["file:/run/lab/console.log"]
    assert option(argv, "-qmp") == ["unix:/run/lab/qmp.sock,server=on,wait=off"]
    assert option(argv, "-pidfile") == ["/run/lab/qemu.pid"]
    assert option(argv, "-kernel") == ["/k/vmlinuz"]


def test_remote_qemu_argv_doubles_commas_in_paths() -> None:
    argv = qemu_argv(remote_spec("/tmp/a,b"))
    assert option(argv, "-serial") == ["file:/tmp/a,,b/console.log"]
    assert option(argv, "-blockdev")[1].endswith("file.filename=/tmp/a,,b/nfs.qcow2")


def test_known_hosts_line_brackets_non_default_ports() -> None:
    assert known_hosts_line("127.0.0.1", 40022, "ssh-ed25519 AAAA") == (
        "[127.0.0.1]:40022 ssh-ed25519 AAAA"
    )
    assert known_hosts_line("127.0.0.1", 22, "ssh-ed25519 AAAA") == "127.0.0.1 ssh-ed25519 AAAA"


def test_qmp_reply_skips_events_and_raises_errors() -> None:
    event = b'{"event": "NIC_RX_FILTER_CHANGED", "data": {}}\n'
    assert qmp_reply([event, b'{"return": {}}\n']) == {}
    with pytest.raises(LabError, match="no such device"):
        qmp_reply([b'{"error": {"class": "DeviceNotFound", "desc": "no such device"}}\n'])


def test_remote_init_script_has_every_name_filled_in() -> None:
    script = init_script()
    assert re.search(r"@[A-Z_]+@", script) is None
    for word in (VG_NAME, THIN_POOL, NFS_EXPORT, NFS_MOUNT, NFS_MOUNT_OPTIONS, READY_MARKER):
        assert word in script
    assert " ".join(NFSD_START) in script


def test_links_to_finds_the_multicall_names(tmp_path: Path) -> None:
    (tmp_path / "lvm").write_text("")
    for name in ("lvs", "lvcreate"):
        (tmp_path / name).symlink_to("lvm")
    (tmp_path / "other").symlink_to("dmsetup")
    assert links_to(tmp_path, "lvm") == ["lvcreate", "lvs"]
