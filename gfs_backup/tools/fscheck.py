"""Read-only filesystem checks of a restored volume image (the drill of lvm generations).

`blkid -p` says what the image holds; a filesystem gfs knows is checked by its own tool in
a mode that never writes (`e2fsck -n`, `btrfs check --readonly`, `xfs_repair -n -f`,
`fsck.vfat -n`); a partition table (a VM disk on an LV) is listed with `partx` and each
partition's filesystem checked. Argv builders and parsers are pure; `check_image` runs them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gfs_backup.transport.runner import Command, CommandError, Runner, check_exit_status

FSCK_TIMEOUT = 3600.0
OUTPUT_TAIL = 300
PROGRESS_LINE = re.compile(r"Pass \d+[A-Z]?: |\[\d+/\d+\] |[\w.]+ \d+\.\d+[.\d]* \(\d")
SECTOR = 512  # partx counts in 512-byte sectors, whatever the disk's own sector size
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
class Partition:
    number: int
    start: int  # bytes from the start of the image
    size: int  # bytes


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


def make_partx_command(image: Path) -> Command:
    """The partitions of a disk image: number, start and length in 512-byte sectors."""
    return Command(("partx", "--raw", "--noheadings", "-o", "NR,START,SECTORS", "--", str(image)))


def parse_partx(output: str) -> list[Partition]:
    """`partx --raw --noheadings -o NR,START,SECTORS` lines as partitions (in bytes).
    Raises ValueError on a line that is not three whole numbers."""
    found = []
    for line in output.splitlines():
        if not line.strip():
            continue
        number, start, sectors = (int(field) for field in line.split())
        found.append(Partition(number, start * SECTOR, sectors * SECTOR))
    return found


def make_extract_command(image: Path, partition: Partition, into: Path) -> Command:
    """Copy one partition of `image` to the new sparse file `into`."""
    return Command(
        ("dd", f"if={image}", f"of={into}", "bs=1M", "iflag=skip_bytes,count_bytes",
         f"skip={partition.start}", f"count={partition.size}", "conv=sparse", "status=none"),
        mutating=True,
        timeout=FSCK_TIMEOUT,
    )  # fmt: skip


def check_image(runner: Runner, image: Path) -> FsCheck:
    """Probe `image` and check the filesystem it holds, never writing to it; an image with
    a partition table (a VM disk on an LV): the filesystem of each partition, each copied
    beside `image` in turn (and removed) because the checkers read whole files only.

    A filesystem with errors, or one whose checker is missing, is not clean. An image with
    no filesystem (raw data, swap) is clean on its checksum alone, and `detail` says so.
    `runner` runs where `image` is (the drill: here). Raises CommandError when blkid,
    partx or dd cannot run.
    """
    fields = _probe(runner, image)
    # A filesystem first: blkid may report a FAT or ISO filesystem with a PTTYPE as well.
    if fields is None or "TYPE" in fields or "PTTYPE" not in fields:
        return _check_filesystem(runner, image, fields, "the volume")
    listed = runner.run(make_partx_command(image))
    try:
        partitions = parse_partx(listed.stdout)
    except ValueError:
        return FsCheck(False, f"partx listed no partitions gfs can read: {listed.stdout[:200]!r}")
    results = [_check_partition(runner, image, partition) for partition in partitions]
    details = "; ".join(result.detail for result in results)
    return FsCheck(
        all(result.clean for result in results),
        f"{fields['PTTYPE']} partition table, {len(partitions)} partition(s): {details}",
    )


def _check_partition(runner: Runner, image: Path, partition: Partition) -> FsCheck:
    piece = image.with_name(f"{image.stem}-partition{partition.number}.raw")
    try:
        runner.run(make_extract_command(image, partition, piece))
        found = _check_filesystem(runner, piece, _probe(runner, piece), "it")
        return FsCheck(found.clean, f"partition {partition.number}: {found.detail}")
    finally:
        piece.unlink(missing_ok=True)


def _probe(runner: Runner, image: Path) -> dict[str, str] | None:
    """blkid's fields of `image`; None when it finds nothing it knows."""
    probed = runner.run(make_blkid_command(image), check=False)
    if probed.returncode == BLKID_NOTHING_FOUND:
        return None
    check_exit_status(probed.command, probed.returncode, probed.stderr)
    return parse_blkid_export(probed.stdout)


def _check_filesystem(
    runner: Runner, image: Path, fields: dict[str, str] | None, what: str
) -> FsCheck:
    fstype = (fields or {}).get("TYPE")
    if fstype is None:
        return FsCheck(True, f"no filesystem on {what}: checked by its checksum only")
    command = make_fsck_command(fstype, image)
    if command is None:
        return FsCheck(True, f"{fstype}: no checker known to gfs, checksum only")
    try:
        done = runner.run(command, check=False)
    except CommandError as exc:  # not installed, or timed out
        package = FSCK_COMMANDS[fstype][1]
        return FsCheck(False, f"cannot check {fstype} ({package}): {exc}")
    if done.returncode == 0:
        return FsCheck(True, f"{fstype}: {command.argv[0]} found no errors")
    output = summarize_findings(f"{done.stdout}\n{done.stderr}")
    return FsCheck(False, f"{fstype}: {command.argv[0]} exit status {done.returncode}: {output}")
