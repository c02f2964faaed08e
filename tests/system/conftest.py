"""Real filesystems for the system tests: btrfs on loop devices, tmpfs targets.

Every fixture removes what it made (also when the test fails): mounts are unmounted,
loop devices detached, images deleted. Names are unique per run, so leftovers of an
earlier crashed run never collide. Without root or btrfs the tests fail with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.system.helpers import CLASSIC_UTC, write_config

Mounter = Callable[..., Path]


def _sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def require_system_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("system tests need root (loop devices, mounts): run ./scripts/test as root")
    for tool in ("btrfs", "mkfs.btrfs", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.fail(f"system tests need {tool}: ./scripts/test installs btrfs-progs")


def _umount(path: Path) -> None:
    for argv in (("umount", str(path)), ("umount", "-l", str(path))):
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounter]:
    """mounts(name, kind="btrfs"|"ext4"|"xfs"|"tmpfs", size_mb=...): a new mounted
    filesystem (XFS with reflink, mkfs.xfs's default; at least 300 MiB)."""
    require_system_tools()
    cleanups: list[Callable[[], None]] = []
    tag = uuid.uuid4().hex[:8]

    def make(name: str, kind: str = "btrfs", size_mb: int = 256) -> Path:
        point = tmp_path / name
        point.mkdir()
        if kind == "tmpfs":
            _sh("mount", "-t", "tmpfs", "-o", f"size={size_mb}m", f"gfs-test-{tag}", str(point))
            cleanups.append(lambda: _umount(point))
            return point
        image = tmp_path / f"{name}-{tag}.img"
        with image.open("wb") as handle:
            handle.truncate(size_mb << 20)
        device = _sh("losetup", "--find", "--show", str(image)).strip()
        cleanups.append(
            lambda: subprocess.run(("losetup", "-d", device), check=False, capture_output=True)
        )
        if kind == "ext4":
            _sh("mkfs.ext4", "-q", "-F", device)
        elif kind == "xfs":
            _sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", device)
        else:
            _sh("mkfs.btrfs", "-q", "-f", device)
        _sh("mount", device, str(point))
        cleanups.append(lambda: _umount(point))
        return point

    try:
        yield make
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


def make_subvolume(path: Path) -> Path:
    _sh("btrfs", "subvolume", "create", str(path))
    return path


def subvolumes_below(path: Path) -> list[str]:
    """Names of btrfs subvolumes under `path` (what `btrfs subvolume list -o` reports)."""
    out = _sh("btrfs", "subvolume", "list", "-o", str(path))
    return sorted(line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line)


class BtrfsJob(NamedTuple):
    """A btrfs subvolume `vol` on a loop device, a tmpfs target, a config with job `vol`."""

    volume: Path
    target: Path
    config: Path


BtrfsJobMaker = Callable[..., BtrfsJob]


@pytest.fixture
def btrfs_job(mounts: Mounter, tmp_path: Path) -> BtrfsJobMaker:
    """btrfs_job(target_mb=32, policy=CLASSIC_UTC): the usual one-job btrfs setup."""

    def make(target_mb: int = 32, policy: str = CLASSIC_UTC) -> BtrfsJob:
        volume = make_subvolume(mounts("src") / "vol")
        target = mounts("tgt", kind="tmpfs", size_mb=target_mb)
        config = write_config(tmp_path, target, "vol", "btrfs", "subvolume", volume, policy)
        return BtrfsJob(volume, target, config)

    return make
