"""Read-only filesystem checks of a restored volume image (the drill of lvm generations).

`blkid -p` says what the image holds; a filesystem gfs knows is checked by its own tool in
a mode that never writes (`e2fsck -n`, `btrfs check --readonly`, `xfs_repair -n`,
`fsck.vfat -n`). Argv builders and the blkid parser are pure; `check_image` runs them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gfs_backup.runner import Command, CommandError, Runner

FSCK_TIMEOUT = 3600.0
OUTPUT_TAIL = 300
PROGRESS_LINE = re.compile(r"Pass \d+[A-Z]?: |\[\d+/\d+\] |[\w.]+ \d+\.\d+[.\d]* \(\d")
# blkid's exit status when it found nothing it knows in the image.
BLKID_NOTHING_FOUND = 2

# TYPE as blkid names it -> (the read-only check's argv before the image path, the package).
FSCK_COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "ext2": (("e2fsck", "-f", "-n"), "e2fsprogs"),
    "ext3": (("e2fsck", "-f", "-n"), "e2fsprogs"),
    "ext4": (("e2fsck", "-f", "-n"), "e2fsprogs"),
    "btrfs": (("btrfs", "check", "--readonly"), "btrfs-progs"),
    "xfs": (("xfs_repair", "-n", "-f"), "xfsprogs"),
    "vfat": (("fsck.vfat", "-n"), "dosfstools"),
}


@dataclass(frozen=True)
class FsCheck:
    """What a check found: `clean` False means the filesystem has errors (`detail`)."""

    clean: bool
    detail: str


def make_blkid_command(image: Path) -> Command:
    return Command(("blkid", "-p", "-o", "export", "--", str(image)), timeout=120)


def parse_blkid_export(output: str) -> dict[str, str]:
    """`blkid -o export` lines (KEY=value) as a dict; other lines are ignored."""
    fields = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            fields[key.strip()] = value.strip()
    return fields


def summarize_findings(output: str) -> str:
    """What a checker found, in one line: its output without progress lines (`Pass 1: ...`,
    `[1/7] checking ...`), version banners and blank lines, cut to OUTPUT_TAIL characters."""
    findings = [
        line.strip()
        for line in output.splitlines()
        if line.strip() and not PROGRESS_LINE.match(line.strip())
    ]
    return " ".join(" ".join(findings).split())[:OUTPUT_TAIL]


def make_fsck_command(fstype: str, image: Path) -> Command | None:
    """The read-only check of a `fstype` filesystem in `image`; None when gfs knows none."""
    known = FSCK_COMMANDS.get(fstype)
    if known is None:
        return None
    return Command((*known[0], str(image)), timeout=FSCK_TIMEOUT)


def check_image(runner: Runner, image: Path) -> FsCheck:
    """Probe `image` and check the filesystem it holds, never writing to it.

    A filesystem with errors, or one whose checker is missing, is not clean. An image with
    no filesystem (a partition table, raw data) is clean on its checksum alone, and
    `detail` says so. `runner` runs where `image` is. Raises CommandError when blkid
    cannot run.
    """
    probed = runner.run(make_blkid_command(image), check=False)
    if probed.returncode == BLKID_NOTHING_FOUND:
        return FsCheck(True, "no filesystem on the volume: checked by its checksum only")
    if probed.returncode != 0:
        return FsCheck(False, f"blkid failed with exit status {probed.returncode}")
    fields = parse_blkid_export(probed.stdout)
    fstype = fields.get("TYPE")
    if fstype is None:
        what = f"a {fields['PTTYPE']} partition table" if "PTTYPE" in fields else "no filesystem"
        return FsCheck(True, f"{what} on the volume: checked by its checksum only")
    command = make_fsck_command(fstype, image)
    if command is None:
        return FsCheck(True, f"{fstype} filesystem: no checker known to gfs, checksum only")
    try:
        done = runner.run(command, check=False)
    except CommandError as exc:  # not installed, or timed out
        package = FSCK_COMMANDS[fstype][1]
        return FsCheck(False, f"cannot check {fstype} ({package}): {exc}")
    if done.returncode == 0:
        return FsCheck(True, f"{fstype}: {command.argv[0]} found no errors")
    output = summarize_findings(f"{done.stdout}\n{done.stderr}")
    return FsCheck(False, f"{fstype}: {command.argv[0]} exit status {done.returncode}: {output}")
