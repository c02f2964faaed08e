"""Does KVM work here? A probe that runs real guest code, bounded in time.

`/dev/kvm` existing proves nothing: on some machines (nested virtualisation without
support, these test machines) it opens, creates a VM, runs real-mode code even, then hangs
or asserts once the guest enters protected mode, as every kernel does at once. So the probe
boots QEMU with KVM on a 64 KiB "BIOS" that switches to 32-bit protected mode and writes to
the isa-debug-exit port: QEMU exits with status (0x31 << 1) | 1 = 99 when the guest got
there. The child is bounded to a few seconds and killed (never waited for beyond that: a
process stuck in the kernel may not die at once). Anything else means TCG.
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from gfs_backup.tools.drillvm import QEMU

PROBE_SECONDS = 3.0  # a working KVM runs the probe in ~0.1 s
_EXIT_PORT = 0xF4
_EXPECTED_STATUS = (0x31 << 1) | 1
_BIOS_SIZE = 64 << 10
_SHADOW = 0xF0000  # the BIOS's last 64 KiB as real mode sees them (segment F000)
_GDT, _GDT_POINTER, _PROTECTED = 0x100, 0x120, 0x200  # offsets in the image


def probe_image() -> bytes:
    """The 64 KiB BIOS image of the probe: reset vector -> F000:0000 -> protected mode ->
    `out 0xf4, 0x31`."""
    image = bytearray(_BIOS_SIZE)
    real = (
        bytes([0xFA])  # cli
        + bytes([0x2E, 0x0F, 0x01, 0x16])
        + struct.pack("<H", _GDT_POINTER)  # lgdt cs:[ptr]
        + bytes([0x0F, 0x20, 0xC0, 0x0C, 0x01, 0x0F, 0x22, 0xC0])  # cr0 |= PE
        + bytes([0x66, 0xEA])
        + struct.pack("<IH", _SHADOW + _PROTECTED, 0x08)  # jmp 08:pm
    )
    image[: len(real)] = real
    flat = (0xFFFF, 0, 0, 0xCF)  # limit 0-15, base 0-15, base 16-23, flags + limit 16-19
    gdt = bytes(8) + b"".join(
        struct.pack("<HHBBBB", flat[0], flat[1], flat[2], access, flat[3], 0)
        for access in (0x9A, 0x92)  # 32-bit code, data
    )
    image[_GDT : _GDT + len(gdt)] = gdt
    image[_GDT_POINTER : _GDT_POINTER + 6] = struct.pack("<HI", len(gdt) - 1, _SHADOW + _GDT)
    protected = (
        bytes([0x66, 0xB8, 0x10, 0x00, 0x8E, 0xD8, 0x8E, 0xD0])  # mov ax, 0x10; ds; ss
        + bytes([0xB0, 0x31, 0xE6, _EXIT_PORT])  # mov al, 0x31; out 0xf4, al
        + bytes([0xF4, 0xEB, 0xFD])  # hlt; jmp back
    )
    image[_PROTECTED : _PROTECTED + len(protected)] = protected
    image[-16:-11] = bytes([0xEA, 0x00, 0x00, 0x00, 0xF0])  # reset vector: jmp F000:0000
    return bytes(image)


def probe_argv(bios: Path, accel: str) -> list[str]:
    return [
        QEMU,
        "-accel",
        accel,
        "-machine",
        "pc",
        "-m",
        "16",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-bios",
        str(bios),
        "-device",
        f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=0x01",
    ]


def runs_guest_code(accel: str, timeout: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Whether QEMU with `accel` runs the probe's guest code within `timeout` seconds, and
    why not."""
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not readable and writable by this user"
    with tempfile.TemporaryDirectory(prefix="gfs-kvm-probe-") as folder:
        bios = Path(folder) / "probe.bin"
        bios.write_bytes(probe_image())
        try:
            process = subprocess.Popen(
                probe_argv(bios, accel),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            return False, f"{QEMU} cannot be run: {exc.strerror}"
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()  # not waited for: it may be stuck in the kernel
            return False, f"a guest under {accel} did not run within {timeout:g} s"
        error = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.returncode != _EXPECTED_STATUS:
            last = error.strip().splitlines()[-1:] or [f"exit status {process.returncode}"]
            return False, f"QEMU with {accel}: {last[0]}"
        return True, ""


@functools.cache
def best_accel() -> tuple[str, str]:
    """("kvm", "") when KVM runs guest code here, else ("tcg", why not KVM); probed once
    per process."""
    works, why = runs_guest_code("kvm")
    return ("kvm", "") if works else ("tcg", why)
