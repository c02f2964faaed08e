"""`gfs run` on real btrfs (loop devices) to a separate mounted target, end to end."""

from __future__ import annotations

import json
import os
from datetime import date, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time

from gfs_backup.tools.btrfs import is_subvolume_root
from tests.conftest import RunGfs
from tests.system.conftest import Mounter, make_subvolume, subvolumes_below
from tests.system.helpers import listing, tree_state, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]


def fill(volume: Path) -> None:
    (volume / "dir").mkdir()
    (volume / "dir" / "random.bin").write_bytes(os.urandom(3 << 20))
    with (volume / "sparse.img").open("wb") as handle:
        handle.seek(40 << 20)
        handle.write(os.urandom(1 << 20))
        handle.truncate(64 << 20)
    (volume / "link").symlink_to("dir/random.bin")
    (volume / "secret").write_text("mode 600\n")
    (volume / "secret").chmod(0o600)
    os.chown(volume / "secret", 1234, 5678)


def test_two_weeks_of_daily_runs_keep_the_classic_rotation(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = mounts("src")
    target = mounts("tgt", kind="tmpfs", size_mb=128)
    volume = make_subvolume(source / "vol")
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", volume)
    first = date(2026, 11, 2)  # a Monday, the first of the month
    for offset in range(14):
        day = first + timedelta(days=offset)
        (volume / "today.txt").write_text(day.isoformat())
        with freeze_time(f"{day.isoformat()}T01:00:00Z"):
            result = run_gfs("run", "--config", str(config), "--json")
        status = json.loads(result.stdout)["jobs"][0]["status"]
        assert result.exit_code == 0, result.output
        assert status == ("not-due" if day.weekday() == 6 else "ok"), result.output
        with freeze_time(f"{day.isoformat()}T02:00:00Z"):  # an hourly timer fires again
            again = run_gfs("run", "--config", str(config), "--json")
        assert json.loads(again.stdout)["jobs"][0]["status"] == "not-due"
    generations = listing(run_gfs("list", "--config", str(config), "--json"))
    assert [(g["id"], g["labels"]) for g in generations] == [
        ("20261102T010000Z", ["grandfather", "father", "son"]),
        ("20261109T010000Z", ["father", "son"]),
        ("20261110T010000Z", ["son"]),
        ("20261111T010000Z", ["son"]),
        ("20261112T010000Z", ["son"]),
        ("20261113T010000Z", ["son"]),
        ("20261114T010000Z", ["son"]),
    ]
    assert all(g["verified"]["result"] == "ok" for g in generations)
    assert subvolumes_below(volume) == []  # every snapshot was removed after its export
    assert sorted(p.name for p in (target / "vol").iterdir()) == [g["id"] for g in generations]
    with freeze_time("2026-11-15T12:00:00Z"):
        status = json.loads(run_gfs("status", "--config", str(config), "--json").stdout)
    (row,) = status["jobs"]
    assert row["last_run"] == "ok" and row["generations"] == 7
    assert row["next_due"] == "2026-11-16T01:00:00+00:00"


def test_btrfs_restore_round_trip_is_byte_for_byte(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = mounts("src")
    target = mounts("tgt", kind="tmpfs", size_mb=128)
    volume = make_subvolume(source / "my vol $(touch pwned)")
    fill(volume)
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", volume)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    stream = Path(generation["path"]) / "subvolume.btrfs"
    assert stream.stat().st_size > 4 << 20
    restored = source / "restored"
    result = run_gfs("restore", "vol", "--config", str(config), "--to", str(restored))
    assert result.exit_code == 0, result.output
    assert is_subvolume_root(restored)
    assert tree_state(restored) == tree_state(volume)
    assert (restored / "sparse.img").stat().st_blocks * 512 < 8 << 20  # still sparse
    (restored / "writable").write_text("yes")  # a normal, writable subvolume
    assert not (Path.cwd() / "pwned").exists()
    again = run_gfs("restore", "vol", "--config", str(config), "--to", str(restored))
    assert again.exit_code == 3 and "already exists" in again.stderr


def test_verify_finds_a_flipped_byte_and_restore_refuses(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = mounts("src")
    target = mounts("tgt", kind="tmpfs", size_mb=128)
    volume = make_subvolume(source / "vol")
    fill(volume)
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", volume)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    assert run_gfs("verify", "--config", str(config)).exit_code == 0
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    stream = Path(generation["path"]) / "subvolume.btrfs"
    with stream.open("r+b") as handle:
        handle.seek(2 << 20)
        byte = handle.read(1)
        handle.seek(2 << 20)
        handle.write(bytes([byte[0] ^ 0x01]))
    result = run_gfs("verify", "--config", str(config))
    assert result.exit_code == 5
    assert "subvolume.btrfs: checksum mismatch (data corrupted)" in result.stdout
    (after,) = listing(run_gfs("list", "--config", str(config), "--json"))
    assert after["verified"]["result"] == "failed"
    refused = run_gfs("restore", "vol", "--config", str(config), "--to", str(source / "r"))
    assert refused.exit_code == 5 and "is damaged, not restored" in refused.stderr
    assert not (source / "r").exists()


def test_local_snapshots_are_kept_but_never_counted(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = mounts("src")
    target = mounts("tgt", kind="tmpfs", size_mb=64)
    volume = make_subvolume(source / "vol")
    policy = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "hourly"
[job.policy.retention]
keep-last = 2
[job.policy.snapshots]
keep = 2
"""
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", volume, policy)
    for hour in range(4):
        with freeze_time(f"2026-11-23T{hour:02d}:00:00Z"):
            assert run_gfs("run", "--config", str(config)).exit_code == 0
    assert len(subvolumes_below(volume)) == 2  # the two newest local snapshots
    assert len(listing(run_gfs("list", "--config", str(config), "--json"))) == 2


def test_periodic_verify_reports_damage_found_later(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = mounts("src")
    target = mounts("tgt", kind="tmpfs", size_mb=64)
    volume = make_subvolume(source / "vol")
    (volume / "f").write_bytes(os.urandom(2 << 20))
    policy = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-daily = 7
[job.policy.verify]
schedule = "Sun 05:00"
"""
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", volume, policy)
    with freeze_time("2026-11-20T00:00:00Z"):  # a Friday
        assert run_gfs("run", "--config", str(config)).exit_code == 0
    (first,) = listing(run_gfs("list", "--config", str(config), "--json"))
    with (Path(first["path"]) / "subvolume.btrfs").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xff")
    with freeze_time("2026-11-21T00:00:00Z"):  # Saturday: no periodic verify due yet
        quiet = run_gfs("run", "--config", str(config))
    assert "failed verification" not in quiet.stderr
    with freeze_time("2026-11-23T00:00:00Z"):  # Monday: Sunday 05:00 has passed
        loud = run_gfs("run", "--config", str(config))
        check = run_gfs("check", "--config", str(config))
    assert loud.exit_code == 0
    assert f"generation {first['id']} failed verification" in loud.stderr
    assert check.exit_code == 7 and "failed verification" in check.stdout
