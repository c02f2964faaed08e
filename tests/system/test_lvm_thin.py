"""Thin LVM volumes read by what changed (thin_delta) on the nested lab host, over SSH, to a
target mounted here: every generation a complete image, compared alone with the volume."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunGfs
from tests.lab.fixtures import remote_host
from tests.lab.remote_host import RemoteHost
from tests.lab.remote_image import NFS_EXPORT, NFS_MOUNT
from tests.system.conftest import Mounter
from tests.system.helpers import gfs_subprocess, listing
from tests.system.test_lvm_remote import VG, gfs_snapshots, lvm_config, ok
from tests.system.test_remote_target import policy as remote_policy
from tests.system.test_remote_target import write_config as write_remote_config

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["remote_host"]

MIB = 1 << 20


def volume_digest(host: RemoteHost, name: str) -> str:
    return ok(host, ["sha256sum", f"/dev/{VG}/{name}"]).split()[0]


def run(config: Path) -> dict[str, Any]:
    done = gfs_subprocess("run", "--force", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    class Listed:
        exit_code, output = 0, ""
        stdout = gfs_subprocess("list", "--config", str(config), "--json").stdout

    newest = listing(Listed())[-1]  # type: ignore[arg-type]
    manifest: dict[str, Any] = json.loads((Path(newest["path"]) / "manifest.json").read_text())
    manifest["path"], manifest["log"] = newest["path"], done.stderr
    return manifest


def image_digest(manifest: dict[str, Any]) -> str:
    with (Path(manifest["path"]) / "volume.raw").open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def test_a_thin_volume_is_read_by_what_changed_and_each_generation_stands_alone(
    remote_host: RemoteHost, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    name = f"thin{uuid.uuid4().hex[:6]}"
    device = f"/dev/{VG}/{name}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-V", "64m", "-T", f"{VG}/thinpool", "-n", name])
    try:
        ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=24"])
        ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=8", "seek=40"])
        target = mounts("tgt", kind="btrfs", size_mb=512)
        config = lvm_config(tmp_path, target, remote_host, name)

        first = run(config)
        capture = first["source"]["capture"]
        assert (capture["mode"], capture["snapshot"]) == ("full", gfs_snapshots(remote_host)[0])
        assert "first run" in capture["reason"]
        expected = [volume_digest(remote_host, name)]
        assert image_digest(first) == expected[0]

        # 2 MiB rewritten, 4 MiB discarded (unmapped in the pool: reads zeros now).
        ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=2", "seek=10"])
        ok(remote_host, ["blkdiscard", "-o", str(40 * MIB), "-l", str(4 * MIB), device])
        second = run(config)
        capture = second["source"]["capture"]
        assert capture["mode"] == "incremental", second["log"]
        assert capture["base"] == first["generation"]
        assert capture["disks"]["volume"]["path"] == "clone"
        assert capture["bytes_read"] <= 3 * MIB  # the rewrite, in whole MiBs; no discard read
        assert capture["disks"]["volume"]["zeroed"] >= 4 * MIB
        assert gfs_snapshots(remote_host) == [capture["snapshot"]]  # the old base went
        expected.append(volume_digest(remote_host, name))
        assert image_digest(second) == expected[1]
        assert second["verify"][-1]["scope"] == "changed+sample"

        verify = gfs_subprocess("verify", "--config", str(config))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        shutil.rmtree(first["path"])  # the second stands alone
        assert image_digest(second) == expected[1]
        restored = tmp_path / "restored.raw"
        done = run_gfs("restore", "db", "--config", str(config), "--to", str(restored))
        assert done.exit_code == 0, done.output
        with restored.open("rb") as handle:
            assert hashlib.file_digest(handle, "sha256").hexdigest() == expected[1]

        # A pool fuller than thin_pool_max_percent: the base is dropped, the run is full.
        text = config.read_text().replace('volume = "', 'thin_pool_max_percent = 1\nvolume = "', 1)
        config.write_text(text)
        ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=1", "seek=3"])
        third = run(config)
        capture = third["source"]["capture"]
        assert capture["mode"] == "full"
        assert "thin_pool_max_percent" in capture["reason"], capture
        assert image_digest(third) == volume_digest(remote_host, name)
    finally:
        for leftover in [*gfs_snapshots(remote_host), name]:
            remote_host.run(["lvremove", "-f", f"{VG}/{leftover}"])


def host_sha256(host: RemoteHost, path: str) -> str:
    return ok(host, ["sha256sum", path]).split()[0]


def remote_manifest(host: RemoteHost, config: Path) -> dict[str, Any]:
    done = gfs_subprocess("list", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    newest = json.loads(done.stdout)["jobs"][0]["generations"][-1]
    manifest: dict[str, Any] = json.loads(ok(host, ["cat", f"{newest['path']}/manifest.json"]))
    manifest["path"] = newest["path"]
    return manifest


def test_a_thin_volume_to_its_hosts_nfs_target_is_cloned_and_patched_on_the_server(
    remote_host: RemoteHost, tmp_path: Path, run_gfs: RunGfs
) -> None:
    """The target is the lab host's NFS 4.2 mount of a btrfs export: the base image is
    cloned on the server (NFS CLONE), only the changed MiBs cross from the snapshot into
    it, on that host; nothing but progress and digests crosses SSH."""
    name = f"thin{uuid.uuid4().hex[:6]}"
    job = f"nfs-{name}"
    device = f"/dev/{VG}/{name}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-V", "64m", "-T", f"{VG}/thinpool", "-n", name])
    config = write_remote_config(tmp_path / "gfs.toml", remote_host, job, name, NFS_MOUNT)
    config.write_text(config.read_text() + remote_policy(5))
    try:
        ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=24"])
        ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=8", "seek=40"])
        done = gfs_subprocess("run", "--force", "--config", str(config))
        assert done.returncode == 0, done.stderr
        first = remote_manifest(remote_host, config)
        capture = first["source"]["capture"]
        assert (capture["mode"], capture["disks"]["volume"]["path"]) == ("full", "new")
        assert first["digest_algorithm"] == "sha256-1m"
        assert host_sha256(remote_host, f"{first['path']}/volume.raw") == host_sha256(
            remote_host, device
        )

        ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=2", "seek=10"])
        ok(remote_host, ["blkdiscard", "-o", str(40 * MIB), "-l", str(4 * MIB), device])
        used_before = int(ok(remote_host, ["df", "-B1", "--output=used", NFS_EXPORT]).split()[-1])
        done = gfs_subprocess("run", "--force", "--config", str(config))
        assert done.returncode == 0, done.stderr
        second = remote_manifest(remote_host, config)
        capture = second["source"]["capture"]
        assert capture["mode"] == "incremental", done.stderr
        assert capture["disks"]["volume"]["path"] == "clone"  # NFS 4.2 CLONE on btrfs
        assert capture["bytes_read"] <= 3 * MIB and capture["disks"]["volume"]["zeroed"] >= 4 * MIB
        used = int(ok(remote_host, ["df", "-B1", "--output=used", NFS_EXPORT]).split()[-1])
        assert used - used_before < 12 * MIB, "the clone took the image's space again"
        assert second["verify"][-1]["scope"] == "changed+sample"
        expected = host_sha256(remote_host, device)
        assert host_sha256(remote_host, f"{second['path']}/volume.raw") == expected

        verify = gfs_subprocess("verify", "--config", str(config))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        ok(remote_host, ["rm", "-rf", first["path"]])  # the second stands alone
        restored = tmp_path / "restored.raw"
        result = run_gfs("restore", job, "--config", str(config), "--to", str(restored))
        assert result.exit_code == 0, result.output
        with restored.open("rb") as handle:
            assert hashlib.file_digest(handle, "sha256").hexdigest() == expected

        # The base damaged on the share in a MiB nothing changed: the sampled check on
        # the clone catches it, and the run reads in full instead of inheriting it.
        image = f"{second['path']}/volume.raw"
        ok(remote_host, ["sh", "-c", f"printf x | dd of={image} bs=1 seek={30 * MIB} conv=notrunc"])
        ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=1", "seek=3"])
        done = gfs_subprocess("run", "--force", "--config", str(config))
        assert done.returncode == 0, done.stderr
        third = remote_manifest(remote_host, config)
        capture = third["source"]["capture"]
        assert capture["mode"] == "full" and "damaged on the target" in capture["reason"]
        assert host_sha256(remote_host, f"{third['path']}/volume.raw") == host_sha256(
            remote_host, device
        )
    finally:
        remote_host.run(["rm", "-rf", f"{NFS_EXPORT}/{job}"])
        for leftover in [*gfs_snapshots(remote_host), name]:
            remote_host.run(["lvremove", "-f", f"{VG}/{leftover}"])
