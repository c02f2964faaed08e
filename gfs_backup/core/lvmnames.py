"""LVM volume names and snapshot sizes as a configuration gives them, checked before any
command is built: LVM allows letters, digits and `+_.-` in VG and LV names (not starting with
`-`), so a name that is anything else is refused as input, never quoted into anything.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
SIZE_RE = re.compile(r"(?i)(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b?|b)?")
MIN_SNAPSHOT = 64 << 20
UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class LvmInputError(ValueError):
    """A volume name or size that gfs refuses."""


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
