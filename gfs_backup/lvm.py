"""LVM commands as argv lists, and parsers of their output (pure, tested on recorded output).

Names are checked here before any command is built: LVM itself allows letters, digits and
`+_.-` in VG and LV names (not starting with `-`), so a name that is anything else is refused
as input, never quoted into anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gfs_backup.runner import Command

NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
SIZE_RE = re.compile(r"(?i)(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b?|b)?")
FIELDS = ("lv_name", "vg_name", "lv_size", "lv_attr", "origin", "pool_lv", "snap_percent")
MIN_SNAPSHOT = 64 << 20
UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
LVM_TIMEOUT = 120.0


class LvmInputError(ValueError):
    """A volume name or size that gfs refuses."""


@dataclass(frozen=True)
class Volume:
    """One line of `lvs`: a logical volume and what gfs needs to know about it."""

    name: str
    vg: str
    size: int
    attr: str
    origin: str = ""
    pool: str = ""
    snap_percent: float | None = None

    @property
    def path(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def is_invalid_snapshot(self) -> bool:
        """An old-style snapshot that overflowed: lvs marks it (I)nvalid, or 100% full."""
        state = self.attr[4:5]
        full = self.snap_percent is not None and self.snap_percent >= 100.0
        return state == "I" or (self.attr[:1] in ("s", "S") and full)


def split_volume(text: str) -> tuple[str, str]:
    """ "vg/lv" → (vg, lv). Raises LvmInputError for anything LVM would not name so."""
    vg, sep, lv = text.partition("/")
    if not sep or not NAME_RE.fullmatch(vg) or not NAME_RE.fullmatch(lv):
        raise LvmInputError(
            f"{text!r} is not VG/LV (letters, digits, '+', '_', '.', '-'; not starting with '-')"
        )
    return vg, lv


def parse_size(text: str, origin_size: int) -> int:
    """A snapshot size: "20%" of the origin, or bytes with K/M/G/T (binary) suffixes.
    At least MIN_SNAPSHOT, at most the origin's size, rounded up to whole MiB."""
    match = SIZE_RE.fullmatch(text.strip())
    if not match:
        raise LvmInputError(f"snapshot_size {text!r}: use a percentage of the origin or 2G, 512M")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise LvmInputError(f"snapshot_size {text!r}: a percentage must be 1-100")
        size = int(origin_size * number / 100)
    else:
        size = int(number * UNITS[unit[0]])
    size = min(max(size, MIN_SNAPSHOT), origin_size)  # LVM caps it at the origin anyway
    return -(-size // (1 << 20)) * (1 << 20)


def make_lvs_command(vg: str, lv: str | None = None) -> Command:
    target = f"{vg}/{lv}" if lv else vg
    return Command(
        (
            "lvs",
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "--separator",
            "|",
            "-o",
            ",".join(FIELDS),
            target,
        ),
        timeout=LVM_TIMEOUT,
    )


def parse_lvs(output: str) -> list[Volume]:
    volumes = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != len(FIELDS):
            raise ValueError(f"unexpected lvs line: {line.strip()!r}")
        name, vg, size, attr, origin, pool, percent = parts
        volumes.append(
            Volume(
                name,
                vg,
                int(float(size)),
                attr,
                origin,
                pool,
                float(percent) if percent else None,
            )
        )
    return volumes


def make_snapshot_command(vg: str, lv: str, name: str, size: int | None) -> Command:
    """`lvcreate -s`: classic with a size (copy-on-write space), thin without one.
    Thin snapshots are created with activation skip off, so they are active at once."""
    sized = ("-L", f"{size}b") if size is not None else ("-kn",)
    return Command(
        ("lvcreate", "--yes", "-s", *sized, "-n", name, f"{vg}/{lv}"),
        mutating=True,
        timeout=LVM_TIMEOUT,
    )


def make_remove_command(vg: str, lv: str) -> Command:
    return Command(("lvremove", "-f", f"{vg}/{lv}"), mutating=True, timeout=LVM_TIMEOUT)


def make_read_command(device: str, timeout: float) -> Command:
    """Read a block device as a stream (dd bypasses the page cache of the host)."""
    return Command(("dd", f"if={device}", "bs=1M", "iflag=direct", "status=none"), timeout=timeout)
