"""Thin LVM delta capture: thin_delta's XML, lvs thin fields, names (pure; the real pool is
in tests/system/test_lvm_thin.py)."""

from __future__ import annotations

import pytest

from gfs_backup.backends.lvm_thin import is_job_snapshot
from gfs_backup.tools.lvm import (
    dm_name,
    make_read_ranges_command,
    make_thin_delta_command,
    parse_thin_delta,
    parse_thin_info,
)

MIB = 1 << 20
# Recorded from thin_delta 0.9.0 (data_block_size 128 sectors = 64 KiB).
DELTA = """<superblock uuid="" time="2" transaction="2" data_block_size="128" nr_data_blocks="1000">
  <diff left="1" right="2">
    <same begin="0" length="3"/>
    <different begin="3" length="2"/>
    <left_only begin="5" length="5"/>
    <right_only begin="20" length="8"/>
    <left_only begin="990" length="40"/>
  </diff>
</superblock>
"""


def test_thin_delta_ranges_in_bytes_clamped_to_the_volume() -> None:
    size = 1000 * 64 * 1024  # the last left_only runs past the (shrunk) volume's end
    changed, unmapped = parse_thin_delta(DELTA, size)
    block = 64 * 1024
    assert changed == [(3 * block, 2 * block), (20 * block, 8 * block)]
    assert unmapped == [(5 * block, 5 * block), (990 * block, 10 * block)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not xml", "not XML"),
        ("<superblock data_block_size='128'/>", "no <superblock><diff>"),
        ("<superblock><diff/></superblock>", "no data_block_size"),
        (
            "<superblock data_block_size='128'><diff><odd begin='1' length='1'/></diff>"
            "</superblock>",
            "unknown range <odd>",
        ),
        (
            "<superblock data_block_size='128'><diff><same begin='x' length='1'/></diff>"
            "</superblock>",
            "invalid literal",
        ),
    ],
)
def test_thin_delta_output_gfs_does_not_understand_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_thin_delta(text, MIB)


def test_thin_info_and_device_mapper_names() -> None:
    info = parse_thin_info("  base|7||\n  thinpool||42.50|9.10\n")
    assert info["base"].thin_id == 7
    assert (info["thinpool"].data_percent, info["thinpool"].metadata_percent) == (42.5, 9.1)
    assert dm_name("vg-data", "thin-pool") == "vg--data-thin--pool"
    argv = make_thin_delta_command("vg-data", "thin-pool", 3, 9).argv
    assert argv == (
        "thin_delta",
        "-m",
        "--snap1",
        "3",
        "--snap2",
        "9",
        "/dev/mapper/vg--data-thin--pool_tmeta",
    )


def test_ranges_reach_the_read_script_as_parameters_only() -> None:
    argv = make_read_ranges_command("/dev/vg/x;rm -rf /", [(0, MIB), (5 * MIB, 2 * MIB)], 60).argv
    assert argv[:2] == ("sh", "-c") and "rm -rf" not in argv[2]
    assert argv[3:] == ("gfs-read-ranges", "/dev/vg/x;rm -rf /", f"0:{MIB}", f"{5 * MIB}:{2 * MIB}")


def test_a_jobs_snapshots_are_told_from_another_jobs() -> None:
    assert is_job_snapshot("gfs-db-20261206T020000Z-r12", "db")
    assert not is_job_snapshot("gfs-db-2-20261206T020000Z-r12", "db")
    assert not is_job_snapshot("gfs-db-20261206T020000Z-r12", "db-2")
    assert not is_job_snapshot("gfs-db-manual", "db")
