"""A target's bandwidth limit, shared by the jobs writing to it at once: gfs's own copies
are paced, a running VM is read from its pull-mode backup export at the limit."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from tests.lab.domains import LabDomain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.system.conftest import Mounter
from tests.system.helpers import KEEP_LAST_ONE, gfs_subprocess, write_config
from tests.system.test_libvirt_snapshot import disk_sources, leftovers

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain"]
MiB = 1 << 20


def limit_target(config: Path, bandwidth: str, concurrency: int = 1) -> None:
    text = config.read_text()
    text = text.replace(
        "require_nfs = false\n", f'require_nfs = false\nbandwidth = "{bandwidth}"\n'
    )
    config.write_text(f"concurrency = {concurrency}\n{text}")


def test_two_files_jobs_share_the_targets_bandwidth(mounts: Mounter, tmp_path: Path) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=128)
    sources = []
    for name in ("a", "b"):
        sources.append(tmp_path / name)
        sources[-1].mkdir()
        (sources[-1] / "data.bin").write_bytes(os.urandom(12 * MiB))
    config = write_config(tmp_path, target, "a", "files", "path", sources[0], KEEP_LAST_ONE)
    second_job = (
        f'[[job]]\nname = "b"\nkind = "files"\npath = {json.dumps(str(sources[1]))}\n'
        + KEEP_LAST_ONE
    )
    config.write_text(config.read_text() + second_job)
    limit_target(config, "8M", concurrency=2)

    started = time.monotonic()
    done = gfs_subprocess("run", "--force", "--config", str(config))
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    for job in ("a", "b"):
        assert f"job {job}: writing at most 4 MiB/s to target usb" in done.stderr
    # 12 MiB each at 4 MiB/s, less one second of credit: unlimited, this takes a fraction
    # of a second.
    assert elapsed >= 2.5, done.stderr
    verify = gfs_subprocess("verify", "--config", str(config))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def data_disk(path: Path, data_mib: int) -> Path:
    """A 64 MiB qcow2 with `data_mib` MiB of random data at 16 MiB, the rest unallocated."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as image:
        image.truncate(64 * MiB)
        image.seek(16 * MiB)
        image.write(os.urandom(data_mib * MiB))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()
    return path


def test_a_running_vm_on_a_limited_target_is_copied_at_the_limit(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    libvirt_conn: libvirt.virConnect,
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=256)
    disk = data_disk(tmp_path / "limited.qcow2", data_mib=6)
    vm: LabDomain = make_domain(action="idle", disk=disk)  # type: ignore[operator]
    vm.wait_for("GFS-GUEST-UP")
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), KEEP_LAST_ONE)
    limit_target(config, "1M")

    started = time.monotonic()
    done = gfs_subprocess("run", "--force", "--config", str(config))
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed >= 4.0, done.stderr  # 6 MiB of data at 1 MiB/s; unlimited: about 1 s
    listed = gfs_subprocess("list", "--config", str(config), "--json")
    (generation,) = json.loads(listed.stdout)["jobs"][0]["generations"]
    manifest = json.loads((Path(generation["path"]) / "manifest.json").read_text())
    # gfs reads the pull-mode export itself, so it paces its own reads.
    assert manifest["source"]["method"] == "pull"
    assert disk_sources(libvirt_conn, vm.name) == [str(disk)]  # no overlay
    assert leftovers(disk) == []
    assert vm.is_active()
    verify = gfs_subprocess("verify", "--config", str(config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
