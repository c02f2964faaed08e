"""Data-directory jobs end to end: plain trees, hard links to the previous generation,
point-in-time on btrfs, restore with metadata."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from freezegun import freeze_time

from tests.conftest import RunGfs
from tests.system.conftest import Mounter, make_subvolume, subvolumes_below
from tests.system.helpers import listing, tree_state, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]


def populate(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "app.conf").write_text("port = 8080\n")
    (root / "etc" / "app.conf").chmod(0o640)
    os.chown(root / "etc" / "app.conf", 0, 33)
    (root / "big.bin").write_bytes(os.urandom(2 << 20))
    with (root / "disk.img").open("wb") as handle:
        handle.seek(30 << 20)
        handle.write(b"data")
    (root / "current").symlink_to("etc/app.conf")
    (root / "name with spaces; $(x)").write_text("odd name\n")


def test_files_job_links_unchanged_files_and_restores_everything(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = tmp_path / "srv"  # on the root filesystem: not btrfs, copied live
    populate(source)
    target = mounts("tgt", kind="tmpfs", size_mb=128)
    config = write_config(tmp_path, target, "srv", "files", "path", source)
    with freeze_time("2026-11-23T01:00:00Z"):
        first_run = run_gfs("run", "--config", str(config))
    assert first_run.exit_code == 0, first_run.output
    assert "copied live, not point-in-time" in first_run.stderr
    (source / "etc" / "app.conf").write_text("port = 9090\n")
    with freeze_time("2026-11-24T01:00:00Z"):
        assert run_gfs("run", "--config", str(config)).exit_code == 0
    first, second = listing(run_gfs("list", "--config", str(config), "--json"))
    assert first["point_in_time"] is False
    old, new = Path(first["path"]) / "data", Path(second["path"]) / "data"
    assert (old / "big.bin").stat().st_ino == (new / "big.bin").stat().st_ino  # linked
    assert (old / "etc/app.conf").stat().st_ino != (new / "etc/app.conf").stat().st_ino
    assert (new / "etc/app.conf").read_text() == "port = 9090\n"
    assert (old / "etc/app.conf").read_text() == "port = 8080\n"  # each tree complete
    assert (new / "disk.img").stat().st_blocks * 512 < 1 << 20  # sparse on the target
    restored = tmp_path / "restored"
    result = run_gfs("restore", "srv", "--config", str(config), "--to", str(restored))
    assert result.exit_code == 0, result.output
    assert tree_state(restored) == tree_state(source)
    assert (restored / "disk.img").stat().st_blocks * 512 < 1 << 20
    assert run_gfs("verify", "--config", str(config)).exit_code == 0
    (new / "etc" / "app.conf").write_text("tampered\n")
    broken = run_gfs("verify", "--config", str(config), "--generation", second["id"])
    assert broken.exit_code == 5 and "etc/app.conf" in broken.stdout


def test_files_on_btrfs_are_snapshotted_first(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    volume = make_subvolume(mounts("src") / "home")
    populate(volume / "alice")
    target = mounts("tgt", kind="tmpfs", size_mb=128)
    config = write_config(tmp_path, target, "alice", "files", "path", volume / "alice")
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    assert generation["point_in_time"] is True
    assert subvolumes_below(volume) == []
    assert tree_state(Path(generation["path"]) / "data") == tree_state(volume / "alice")
