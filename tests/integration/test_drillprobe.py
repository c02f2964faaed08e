"""Port probes against a real QEMU user-mode network (a guest without a network stack:
the connection stays SYN_SENT inside, which the probe reports as no answer), and the
parsing of QEMU's `info usernet`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from gfs_backup.tools.drillprobe import connection_state, free_port, probe_ports
from gfs_backup.tools.drillvm import _nic

USERNET = """Hub -1 (#net059):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[SYN_SENT]       9       127.0.0.1 23456       10.0.2.15  8080     0     0
  TCP[HOST_FORWARD]   8       127.0.0.1 23456       10.0.2.15  8080     0     0
  TCP[ESTABLISHED]   11       127.0.0.1 23457       10.0.2.15    22     0     0
"""


def test_info_usernet_rows_give_the_forwarded_connection_state() -> None:
    assert connection_state(USERNET, 8080) == "SYN_SENT"
    assert connection_state(USERNET, 22) == "ESTABLISHED"
    assert connection_state(USERNET, 5432) is None


def test_the_drill_network_is_restricted_and_forwards_only_on_loopback() -> None:
    assert _nic(()) == "none"
    assert _nic(((22, 40022), (5432, 45432))) == (
        "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22,"
        "hostfwd=tcp:127.0.0.1:45432-:5432"
    )


def test_a_guest_without_an_address_is_reported_as_no_answer(tmp_path: Path) -> None:
    bios = tmp_path / "halt.bin"
    bios.write_bytes(bytes(64 * 1024 - 16) + bytes([0xF4, 0xEB, 0xFD]) + bytes(13))
    host = free_port()
    monitor = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "32",
            "-nodefaults", "-display", "none", "-bios", str(bios),
            "-nic", _nic(((8080, host),)), "-qmp", f"unix:{monitor},server=on,wait=off",
        ]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not monitor.exists():
            assert time.monotonic() < deadline and qemu.poll() is None
            time.sleep(0.1)
        (probe,) = probe_ports(((8080, host),), monitor, timeout=3)
    finally:
        qemu.kill()
        qemu.wait()
    assert not probe.passed
    assert "no answer within 3 s (SYN_SENT)" in probe.detail
    assert "static configuration" in probe.detail
