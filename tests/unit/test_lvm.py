"""LVM argv builders and parsers (gfs_backup.tools.lvm) on recorded `lvs` output."""

from __future__ import annotations

import pytest

from gfs_backup.core.lvmnames import LvmInputError, parse_size, split_volume
from gfs_backup.tools.lvm import (
    make_lvs_command,
    make_remove_command,
    make_snapshot_command,
    parse_lvs,
)

# lvs --noheadings --nosuffix --units b --separator '|' -o lv_name,vg_name,lv_size,lv_attr,
# origin,pool_lv,snap_percent, recorded in the lab guest (classic, thin, overflowed).
LVS = """\
  data|gfslab|268435456|-wi-ao----|||
  gfs-db-20261123T101010Z-r4|gfslab|67108864|swi-a-s---|data||12.50
  gfs-db-20261123T111010Z-r5|gfslab|67108864|swi-I-s---|data||100.00
  thin1|gfslab|536870912|Vwi-a-tz--||thinpool|
  gfs-t-20261123T101010Z-r1|gfslab|536870912|Vwi-a-tz-k|thin1|thinpool|
"""


def test_parse_lvs_classic_thin_and_invalid_snapshots() -> None:
    data, snap, broken, thin, thin_snap = parse_lvs(LVS)
    assert (data.name, data.vg, data.size, data.is_thin) == ("data", "gfslab", 256 << 20, False)
    assert data.path == "/dev/gfslab/data"
    assert snap.origin == "data" and snap.snap_percent == 12.5 and not snap.is_invalid_snapshot
    assert broken.is_invalid_snapshot
    assert thin.is_thin and thin.pool == "thinpool"
    assert thin_snap.is_thin and thin_snap.origin == "thin1" and not thin_snap.is_invalid_snapshot
    with pytest.raises(ValueError, match="unexpected lvs line"):
        parse_lvs("garbage\n")


@pytest.mark.parametrize(
    "text",
    ["vg", "vg/", "/lv", "-vg/lv", "vg/-lv", "vg/l v", "vg/lv;rm -rf /", "vg/$(x)", "vg/a/b", ""],
)
def test_hostile_or_malformed_volume_names_are_refused(text: str) -> None:
    with pytest.raises(LvmInputError, match="is not VG/LV"):
        split_volume(text)


def test_odd_but_valid_names_stay_single_argv_elements() -> None:
    vg, lv = split_volume("vg.0/web+01_data-x")
    assert make_lvs_command(vg, lv).argv[-1] == "vg.0/web+01_data-x"
    command = make_snapshot_command(vg, lv, "gfs-web-20261123T000000Z-r1", 64 << 20)
    assert command.argv == (
        "lvcreate",
        "--yes",
        "-s",
        "-L",
        f"{64 << 20}b",
        "-n",
        "gfs-web-20261123T000000Z-r1",
        "vg.0/web+01_data-x",
    )
    assert command.mutating
    assert "-kn" in make_snapshot_command(vg, lv, "s", None).argv  # thin: active at once
    assert make_remove_command(vg, "s").argv == ("lvremove", "-f", "vg.0/s")


@pytest.mark.parametrize(
    ("text", "origin", "expected"),
    [
        ("20%", 10 << 30, 2048 << 20),
        ("2G", 10 << 30, 2 << 30),
        ("100G", 1 << 30, 1 << 30),  # never more than the origin
        ("512M", 10 << 30, 512 << 20),
        ("1%", 1 << 30, 64 << 20),  # never below 64 MiB ...
        ("1%", 32 << 20, 32 << 20),  # ... unless the origin is smaller
        ("100000", 1 << 30, 64 << 20),
        ("33%", 100 << 20, 64 << 20),
        ("50%", 301 << 20, 151 << 20),  # rounded up to whole MiB
    ],
)
def test_snapshot_sizes(text: str, origin: int, expected: int) -> None:
    assert parse_size(text, origin) == expected


@pytest.mark.parametrize("text", ["0%", "150%", "lots", "2X", "-1G"])
def test_bad_snapshot_sizes(text: str) -> None:
    with pytest.raises(LvmInputError):
        parse_size(text, 1 << 30)
