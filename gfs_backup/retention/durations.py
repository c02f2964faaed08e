"""keep-within durations in each tool's own syntax."""

from __future__ import annotations

import re

from gfs_backup.retention.model import KeepWithin, Semantics

# borg 1.x `interval()`: one integer and one unit; m and y are fixed lengths.
_BORG_UNITS = {"H": 3600, "d": 86400, "w": 7 * 86400, "m": 31 * 86400, "y": 365 * 86400}
_BORG_RE = re.compile(r"(\d+)([Hdwmy])")
# restic `ParseDuration`: a sequence of <number><unit>, units y, m, d, h; a repeated unit
# overrides the earlier one. restic's CLI refuses negative numbers for keep-within.
_RESTIC_PART_RE = re.compile(r"(-?\d+)([ymdh])")


def parse_keep_within(text: str, semantics: Semantics) -> KeepWithin:
    """Parse `text` as the selected tool does. Raises ValueError with the accepted syntax."""
    if semantics == "borg":
        return _parse_borg_interval(text)
    if semantics == "restic":
        return _parse_restic_duration(text)
    raise ValueError(
        f"keep-within is not a rule of {semantics} semantics; use borg or restic semantics"
    )


def _parse_borg_interval(text: str) -> KeepWithin:
    match = _BORG_RE.fullmatch(text)
    if not match:
        raise ValueError(
            f"invalid borg interval {text!r}: use <integer><unit>, unit one of "
            "H d w m y (m = 31 days, y = 365 days), e.g. 26H or 2w"
        )
    number = int(match.group(1))
    if number <= 0:
        raise ValueError(f"invalid borg interval {text!r}: the number must be greater than 0")
    return KeepWithin(text=text, seconds=number * _BORG_UNITS[match.group(2)])


def _parse_restic_duration(text: str) -> KeepWithin:
    hint = "use numbers with units y m d h (calendar years, months, days; hours), e.g. 1y2m3d3h"
    text = text.strip()
    if not text:
        raise ValueError(f"empty restic duration: {hint}")
    parts: dict[str, int] = {}
    pos = 0
    for match in _RESTIC_PART_RE.finditer(text):
        if match.start() != pos:
            break
        parts[match.group(2)] = int(match.group(1))
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"invalid restic duration {text!r}: {hint}")
    if any(value < 0 for value in parts.values()):
        raise ValueError(f"negative values are not allowed in keep-within {text!r}")
    return KeepWithin(
        text=text,
        years=parts.get("y", 0),
        months=parts.get("m", 0),
        days=parts.get("d", 0),
        hours=parts.get("h", 0),
    )
