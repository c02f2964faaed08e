"""fscheck: the read-only filesystem check of restored volume images, on real small images
made here with mkfs (the parser and argv builders on recorded blkid output)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gfs_backup.tools.fscheck import (
    Partition,
    check_image,
    make_fsck_command,
    parse_blkid_export,
    parse_partx,
    summarize_findings,
)
from gfs_backup.transport.runner import Command, LocalRunner

pytestmark = pytest.mark.integration

MIB = 1 << 20
# `blkid -p -o export` of an ext4 image, as printed by util-linux 2.38 (Debian 12).
BLKID_EXT4 = """DEVNAME=/var/tmp/volume.raw
UUID=0b6e1c9f-5a3e-4c7b-9b1e-3f2a8d6c4e10
VERSION=1.0
BLOCK_SIZE=4096
TYPE=ext4
USAGE=filesystem
"""


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"


def blank(path: Path, mib: int) -> Path:
    with path.open("wb") as handle:
        handle.truncate(mib * MIB)
    return path


def ext4_image(tmp_path: Path) -> Path:
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "hostname").write_text("db01\n")
    (content / "data.bin").write_bytes(bytes(range(256)) * 4096)
    image = blank(tmp_path / "volume.raw", 32)
    sh("mkfs.ext4", "-q", "-F", "-d", str(content), str(image))
    return image


def test_blkid_export_is_parsed_into_its_fields() -> None:
    fields = parse_blkid_export(BLKID_EXT4 + "garbage line\n")
    assert fields["TYPE"] == "ext4" and fields["USAGE"] == "filesystem"
    assert "garbage line" not in fields


def test_a_checkers_findings_drop_its_progress_lines_and_banner() -> None:
    output = (
        "Opening filesystem to check...\nChecking filesystem on v.raw\n"
        "[1/7] checking root items\n[2/7] checking extents\n"
        "ERROR: errors found in extent allocation tree or chunk allocation\n"
        "btrfs-progs v6.2\ne2fsck 1.47.0 (5-Feb-2023)\nPass 1: Checking inodes\n"
    )
    assert summarize_findings(output) == (
        "Opening filesystem to check... Checking filesystem on v.raw "
        "ERROR: errors found in extent allocation tree or chunk allocation btrfs-progs v6.2"
    )


def test_fsck_commands_never_write() -> None:
    image = Path("/var/tmp/v.raw")
    assert make_fsck_command("ext4", image).argv == ("e2fsck", "-f", "-n", str(image))  # type: ignore[union-attr]
    assert make_fsck_command("btrfs", image).argv == (  # type: ignore[union-attr]
        "btrfs",
        "check",
        "--readonly",
        str(image),
    )
    assert make_fsck_command("xfs", image).argv[:2] == ("xfs_repair", "-n")  # type: ignore[union-attr]
    assert make_fsck_command("ntfs", image) is None


def test_a_clean_ext4_image_passes_and_is_not_written(tmp_path: Path) -> None:
    image = ext4_image(tmp_path)
    before = image.read_bytes()
    checked = check_image(LocalRunner(), image)
    assert checked.clean, checked.detail
    assert checked.detail == "ext4: e2fsck found no errors"
    assert image.read_bytes() == before


def test_an_ext4_image_with_a_broken_root_directory_fails_naming_the_error(
    tmp_path: Path,
) -> None:
    image = ext4_image(tmp_path)
    sh("debugfs", "-w", "-R", "clri <2>", str(image))  # clears the root directory's inode
    checked = check_image(LocalRunner(), image)
    assert not checked.clean
    assert checked.detail.startswith("ext4: e2fsck exit status 12: Root inode is not a directory")
    assert "Root inode is not a directory" in checked.detail


def test_a_btrfs_image_is_checked_by_btrfs_check(tmp_path: Path) -> None:
    image = blank(tmp_path / "volume.raw", 128)
    sh("mkfs.btrfs", "-q", "-f", str(image))
    checked = check_image(LocalRunner(), image)
    assert checked.clean, checked.detail
    assert checked.detail == "btrfs: btrfs found no errors"


def test_a_volume_without_a_filesystem_passes_on_its_checksum_and_says_so(
    tmp_path: Path,
) -> None:
    zeros = blank(tmp_path / "zeros.raw", 4)
    assert check_image(LocalRunner(), zeros).detail == (
        "no filesystem on the volume: checked by its checksum only"
    )


def partitioned_disk(folder: Path, first_partition: Path) -> Path:
    """A 64 MiB disk image with a dos partition table: partition 1 (1 MiB on, 32 MiB) holds
    `first_partition`, partition 2 (the next 16 MiB) holds no filesystem."""
    disk = blank(folder / "disk.raw", 64)
    mbr = bytearray(512)
    for index, (start, sectors) in enumerate([(2048, 65536), (67584, 32768)]):
        offset = 446 + 16 * index
        mbr[offset : offset + 16] = (
            bytes([0, 0, 0, 0, 0x83, 0, 0, 0])
            + start.to_bytes(4, "little")
            + sectors.to_bytes(4, "little")
        )
    mbr[510:512] = b"\x55\xaa"
    with disk.open("r+b") as handle:
        handle.write(mbr)
        handle.seek(2048 * 512)
        handle.write(first_partition.read_bytes())
    return disk


def test_a_disk_image_has_the_filesystem_of_each_partition_checked(tmp_path: Path) -> None:
    clean = ext4_image(tmp_path)
    disk = partitioned_disk(tmp_path, clean)
    checked = check_image(LocalRunner(), disk)
    assert checked.clean, checked.detail
    assert checked.detail == (
        "dos partition table, 2 partition(s): partition 1: ext4: e2fsck found no errors; "
        "partition 2: no filesystem on it: checked by its checksum only"
    )
    assert sorted(p.name for p in tmp_path.glob("disk-partition*")) == []  # copies removed
    sh("debugfs", "-w", "-R", "clri <2>", str(clean))
    broken = check_image(LocalRunner(), partitioned_disk(tmp_path, clean))
    assert not broken.clean
    assert "partition 1: ext4: e2fsck exit status 12: Root inode is not a directory" in (
        broken.detail
    )


def test_partx_output_is_read_in_bytes() -> None:
    assert parse_partx("1 2048 65536\n2 67584 32768\n\n") == [
        Partition(1, 2048 * 512, 65536 * 512),
        Partition(2, 67584 * 512, 32768 * 512),
    ]
    with pytest.raises(ValueError):
        parse_partx("1 2048\n")


def test_a_missing_checker_is_a_failed_check_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = ext4_image(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(
        "gfs_backup.tools.fscheck.make_blkid_command",
        lambda path: Command(("/usr/sbin/blkid", "-p", "-o", "export", "--", str(path))),
    )
    checked = check_image(LocalRunner(), image)
    assert not checked.clean
    assert checked.detail.startswith("cannot check ext4 (e2fsprogs): e2fsck: not installed")
