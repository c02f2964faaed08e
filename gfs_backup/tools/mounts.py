"""Which filesystem holds a path: /proc/self/mountinfo, parsed as a pure function."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
NFS_TYPES = frozenset({"nfs", "nfs4"})


@dataclass(frozen=True)
class Mount:
    mount_id: int
    device: str  # "major:minor" of the filesystem (btrfs subvolumes share it)
    root: str  # the directory of the filesystem that is mounted here
    mount_point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out = []
    index = 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1 : index + 4].isdigit():
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/PID/mountinfo (proc(5)). Raises ValueError on a malformed line."""
    mounts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    device=fields[2],
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    fstype=fields[separator + 1],
                    source=_unescape(fields[separator + 2]),
                )
            )
        except (ValueError, IndexError):
            raise ValueError(f"mountinfo line {number} is malformed: {line[:80]!r}") from None
    return mounts


Resolve = Callable[[Path], str]


def mount_of(path: Path, mounts: list[Mount], resolve: Resolve = os.path.realpath) -> Mount:
    """The mount that holds `path` (resolved by `resolve`, on the host of `mounts`): the
    last-mounted longest matching mount point."""
    resolved = resolve(path)
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    if best is None:
        raise ValueError(f"no mount holds {path}")
    return best


def read_mounts() -> list[Mount]:
    return parse_mountinfo(MOUNTINFO.read_text(encoding="utf-8"))


def is_mount_point(path: Path, mounts: list[Mount], resolve: Resolve = os.path.realpath) -> bool:
    resolved = resolve(path)
    return any(mount.mount_point == resolved for mount in mounts)
