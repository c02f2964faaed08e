"""Every failure of issue 3 on real filesystems: each leaves nothing half-done."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from freezegun import freeze_time

from gfs_backup.core.lock import job_lock
from tests.conftest import RunGfs
from tests.system.conftest import BtrfsJobMaker, Mounter, make_subvolume, subvolumes_below
from tests.system.helpers import KEEP_LAST_ONE, gfs_subprocess, listing, write_config

pytestmark = [pytest.mark.system, pytest.mark.slow]


def leftovers(job_dir: Path) -> list[str]:
    return sorted(p.name for p in job_dir.iterdir() if p.name.startswith("."))


def test_unmounted_target_is_never_written(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    volume = make_subvolume(mounts("src") / "vol")
    empty_mount_point = tmp_path / "mnt-backup"
    empty_mount_point.mkdir()
    config = write_config(tmp_path, empty_mount_point, "vol", "btrfs", "subvolume", volume)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 5
    assert "is not a mounted filesystem" in result.stderr
    assert list(empty_mount_point.iterdir()) == []
    assert subvolumes_below(volume) == []  # checked before any snapshot was taken


def test_target_on_the_source_filesystem_is_refused(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    source = mounts("src")
    volume = make_subvolume(source / "vol")
    (source / "backups").mkdir()
    same = tmp_path / "same"
    same.mkdir()
    subprocess.run(["mount", "--bind", str(source / "backups"), str(same)], check=True)
    try:
        config = write_config(tmp_path, same, "vol", "btrfs", "subvolume", volume)
        result = run_gfs("run", "--config", str(config))
        assert result.exit_code == 5
        assert "is on the same filesystem as the source" in result.stderr
        assert list(same.iterdir()) == []
    finally:
        subprocess.run(["umount", str(same)], check=False)


def test_nfs_is_required_unless_the_target_says_otherwise(
    btrfs_job: BtrfsJobMaker, tmp_path: Path, run_gfs: RunGfs
) -> None:
    _volume, _target, config = btrfs_job()
    config.write_text(config.read_text().replace("require_nfs = false", "require_nfs = true"))
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 5
    assert "is tmpfs, not NFS" in result.stderr and "require_nfs = false" in result.stderr


def test_full_target_removes_the_partial_and_keeps_earlier_generations(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    volume = make_subvolume(mounts("src") / "vol")
    target = mounts("tgt", kind="tmpfs", size_mb=8)
    (volume / "small").write_bytes(os.urandom(1 << 20))
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", volume)
    assert run_gfs("run", "--config", str(config)).exit_code == 0
    (volume / "big").write_bytes(os.urandom(12 << 20))
    result = run_gfs("run", "--config", str(config), "--force")
    assert result.exit_code == 5
    assert "is full (no space left on device)" in result.stderr
    assert "the partial export was removed, earlier generations are untouched" in result.stderr
    assert leftovers(target / "vol") == []
    assert subvolumes_below(volume) == []
    (earlier,) = listing(run_gfs("list", "--config", str(config), "--json"))
    assert run_gfs("verify", "--config", str(config)).exit_code == 0
    assert earlier["verified"]["result"] == "ok"


def test_missing_source_subvolume(mounts: Mounter, tmp_path: Path, run_gfs: RunGfs) -> None:
    source = mounts("src")
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", source / "gone")
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 5
    assert f"job vol: source subvolume {source / 'gone'} does not exist" in result.stderr
    plain = source / "plain"
    plain.mkdir()
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", plain)
    result = run_gfs("run", "--config", str(config))
    assert "is not a btrfs subvolume" in result.stderr


@pytest.mark.parametrize("name", ["../etc", "a b", "x;rm -rf /", "$(reboot)", ".."])
def test_hostile_job_names_are_refused(tmp_path: Path, run_gfs: RunGfs, name: str) -> None:
    config = write_config(tmp_path, tmp_path, name, "files", "path", tmp_path)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 3
    assert "invalid job name" in result.stderr
    assert not (tmp_path / "state").exists()


def test_edited_or_truncated_manifest(
    btrfs_job: BtrfsJobMaker, tmp_path: Path, run_gfs: RunGfs
) -> None:
    _volume, target, config = btrfs_job(target_mb=64, policy=KEEP_LAST_ONE)
    with freeze_time("2026-11-20T03:00:00Z"):
        assert run_gfs("run", "--config", str(config)).exit_code == 0
    (first,) = listing(run_gfs("list", "--config", str(config), "--json"))
    manifest = Path(first["path"]) / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    with freeze_time("2026-11-21T03:00:00Z"):
        result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    # keep-last 1 would prune the first generation, but an unreadable manifest is never
    # planned, pruned or restored: it stays for a human to look at.
    assert Path(first["path"]).is_dir()
    shown = run_gfs("list", "--config", str(config))
    assert "manifest.json: not valid JSON" in shown.stdout
    assert len(listing(run_gfs("list", "--config", str(config), "--json"))) == 1
    edited = target / "vol" / listing(run_gfs("list", "--config", str(config), "--json"))[0]["id"]
    text = (edited / "manifest.json").read_text().replace('"size": ', '"size": -')
    (edited / "manifest.json").write_text(text)
    result = run_gfs("list", "--config", str(config))
    assert "files[0]: negative size" in result.stdout


def test_second_run_while_the_lock_is_held(
    btrfs_job: BtrfsJobMaker, tmp_path: Path, run_gfs: RunGfs
) -> None:
    volume, _target, config = btrfs_job()
    with job_lock(tmp_path / "state", "vol", wait=False):
        result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 6
    assert "another gfs run holds its lock" in result.stderr and "--wait" in result.stderr
    assert subvolumes_below(volume) == []


def test_dry_run_changes_nothing(btrfs_job: BtrfsJobMaker, tmp_path: Path, run_gfs: RunGfs) -> None:
    volume, target, config = btrfs_job()
    result = run_gfs("run", "--config", str(config), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would snapshot" in result.stderr
    assert list(target.iterdir()) == []
    assert not (tmp_path / "state").exists()
    assert subvolumes_below(volume) == []


@pytest.mark.parametrize("point", ["after-snapshot", "mid-export", "before-publish", "mid-prune"])
def test_killed_run_is_cleaned_up_by_the_next(mounts: Mounter, tmp_path: Path, point: str) -> None:
    volume = make_subvolume(mounts("src") / "vol")
    (volume / "data").write_bytes(os.urandom(6 << 20))
    target = mounts("tgt", kind="tmpfs", size_mb=128)
    config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", volume, KEEP_LAST_ONE)
    args = ("run", "--force", "--config", str(config))
    assert gfs_subprocess(*args).returncode == 0
    killed = gfs_subprocess(*args, env={"GFS_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr
    job_dir = target / "vol"
    if point in ("mid-export", "before-publish"):
        assert any(name.startswith(".partial-") for name in leftovers(job_dir))
    if point == "mid-prune":
        assert any(name.startswith(".pruning-") for name in leftovers(job_dir))
    if point != "mid-prune":
        assert subvolumes_below(volume) != []  # the killed run's snapshot is still there
    healed = gfs_subprocess(*args)
    assert healed.returncode == 0, healed.stderr
    assert "reconcile" in healed.stderr
    assert leftovers(job_dir) == []
    assert subvolumes_below(volume) == []
    generations = [p for p in job_dir.iterdir()]
    assert len(generations) == 1  # keep-last 1: nothing half-pruned, nothing extra
    assert gfs_subprocess("verify", "--config", str(config)).returncode == 0


def test_one_failing_job_does_not_stop_the_others(
    mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=32)
    good = tmp_path / "good"
    good.mkdir()
    (good / "file").write_text("kept\n")
    config = write_config(tmp_path, target, "good", "files", "path", good)
    text = config.read_text()
    job = text[text.index("[[job]]") :]
    bad = job.replace('name = "good"', 'name = "bad"').replace(str(good), str(tmp_path / "gone"))
    config.write_text("concurrency = 2\n" + text + "\n" + bad)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 4, result.output
    assert "good: ok" in result.stdout
    assert f"bad: failed: job bad: source directory {tmp_path / 'gone'} does not exist" in (
        result.stdout
    )
    assert len(listing(run_gfs("list", "good", "--config", str(config), "--json"))) == 1
