"""btrfs: argv builders, the parser of `btrfs subvolume show`, and subvolume lookups."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gfs_backup.transport.runner import Command

SUBVOLUME_ROOT_INODE = 256  # BTRFS_FIRST_FREE_OBJECTID: the root directory of a subvolume
LONG = 24 * 3600.0  # send/receive of a large subvolume may take hours


def make_snapshot_command(source: Path, destination: Path) -> Command:
    return Command(
        ("btrfs", "subvolume", "snapshot", "-r", str(source), str(destination)), mutating=True
    )


def make_writable_snapshot_command(source: Path, destination: Path) -> Command:
    return Command(("btrfs", "subvolume", "snapshot", str(source), str(destination)), mutating=True)


def make_delete_command(subvolume: Path) -> Command:
    return Command(
        ("btrfs", "subvolume", "delete", "--commit-after", str(subvolume)), mutating=True
    )


def make_show_command(path: Path) -> Command:
    return Command(("btrfs", "subvolume", "show", str(path)))


def make_subvolume_list_command(mount_point: Path) -> Command:
    """Every subvolume of the filesystem mounted at `mount_point` (paths from its top)."""
    return Command(("btrfs", "subvolume", "list", str(mount_point)))


def parse_subvolume_list(text: str) -> list[str]:
    """The paths of `btrfs subvolume list` ("ID 257 gen 9 top level 5 path @/home"),
    relative to the filesystem's top level. ValueError on a line without a path."""
    paths = []
    for line in text.splitlines():
        if not line.strip():
            continue
        head, found, path = line.partition(" path ")
        if not found or not head.startswith("ID ") or not path:
            raise ValueError(f"unexpected btrfs subvolume list line: {line.strip()!r}")
        paths.append(path)
    return paths


def make_send_command(snapshot: Path) -> Command:
    return Command(("btrfs", "send", "-q", str(snapshot)), timeout=LONG)


def make_receive_command(directory: Path) -> Command:
    return Command(("btrfs", "receive", "-q", str(directory)), mutating=True, timeout=LONG)


@dataclass(frozen=True)
class SubvolumeInfo:
    name: str
    uuid: str
    parent_uuid: str | None
    received_uuid: str | None
    subvolume_id: int
    readonly: bool


def parse_subvolume_show(text: str) -> SubvolumeInfo:
    """Parse `btrfs subvolume show` (btrfs-progs 5.x/6.x). Raises ValueError if malformed."""
    fields: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        key, colon, value = line.strip().partition(":")
        if colon and key and key not in fields:
            fields[key.strip()] = value.strip()
    try:

        def optional(key: str) -> str | None:
            value = fields[key]
            return None if value == "-" else value

        return SubvolumeInfo(
            name=fields["Name"],
            uuid=fields["UUID"],
            parent_uuid=optional("Parent UUID"),
            received_uuid=optional("Received UUID"),
            subvolume_id=int(fields["Subvolume ID"]),
            readonly="readonly" in fields.get("Flags", ""),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unexpected output of btrfs subvolume show (missing {exc})") from None


def is_subvolume_root(path: Path) -> bool:
    """True for the root directory of a btrfs subvolume (inode 256)."""
    try:
        return (
            path.is_dir() and not path.is_symlink() and path.stat().st_ino == (SUBVOLUME_ROOT_INODE)
        )
    except OSError:
        return False


def containing_subvolume(path: Path) -> Path:
    """The root of the subvolume that holds `path` (same st_dev, inode 256, walking up)."""
    current = Path(os.path.realpath(path))
    device = current.stat().st_dev
    while True:
        if current.stat().st_ino == SUBVOLUME_ROOT_INODE:
            return current
        parent = current.parent
        if parent == current or parent.stat().st_dev != device:
            return current
        current = parent
