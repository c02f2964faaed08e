"""lvm jobs on a remote host over SSH: the nested lab guest (real LVM, sshd) is the host,
gfs runs here and drives it with the SSH runner; the image streams to a local target."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.conftest import RunGfs
from tests.lab.fixtures import remote_host
from tests.lab.remote_host import RemoteHost
from tests.system.conftest import Mounter
from tests.system.helpers import gfs_subprocess, listing, run_cutting_the_link

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["remote_host"]

VG = "gfslab"
DAILY = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 3
"""


def ok(host: RemoteHost, argv: list[str]) -> str:
    done = host.run(argv, timeout=300)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


@pytest.fixture
def volume(remote_host: RemoteHost) -> Iterator[str]:
    """A fresh 96 MiB LV with 40 MiB of random data (the rest zero); removed with its
    gfs snapshots at the end."""
    name = f"t{uuid.uuid4().hex[:8]}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-Zy", "-Wy", "-L", "96m", "-n", name, VG])
    device = f"/dev/{VG}/{name}"
    ok(remote_host, ["dd", "if=/dev/zero", f"of={device}", "bs=1M", "count=96", "oflag=direct"])
    ok(remote_host, ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=40", "seek=8"])
    yield name
    names = ok(remote_host, ["lvs", "--noheadings", "-o", "lv_name", VG]).split()
    for leftover in [n for n in names if n.startswith("gfs-")] + [name]:
        remote_host.run(["lvremove", "-f", f"{VG}/{leftover}"])


def in_job_dir(target: Path) -> list[str]:
    folder = target / "db"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def gfs_snapshots(host: RemoteHost) -> list[str]:
    return [
        n for n in ok(host, ["lvs", "--noheadings", "-o", "lv_name", VG]).split() if "gfs-" in n
    ]


def lvm_config(
    tmp_path: Path, target: Path, host: RemoteHost, volume: str, extra: str = ""
) -> Path:
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        f"[target.local]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
        f"[hosts.lab]\naddress = {json.dumps(host.address)}\nport = {host.port}\n"
        f"user = {json.dumps(host.user)}\n"
        f"identity_file = {json.dumps(str(host.identity_file))}\n"
        f"known_hosts = {json.dumps(str(host.known_hosts_file))}\n"
        f'[[job]]\nname = "db"\nkind = "lvm"\nhost = "lab"\n'
        f"volume = {json.dumps(f'{VG}/{volume}')}\n{extra}{DAILY}",
        encoding="utf-8",
    )
    return config


@pytest.mark.parametrize("image_format", ["raw", "qcow2"])
def test_a_remote_lv_is_snapshotted_exported_sparse_and_restored(
    image_format: str,
    remote_host: RemoteHost,
    volume: str,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=256)
    config = lvm_config(tmp_path, target, remote_host, volume, f'format = "{image_format}"\n')
    expected = ok(remote_host, ["sha256sum", f"/dev/{VG}/{volume}"]).split()[0]
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert gfs_snapshots(remote_host) == []  # removed right after the export
    (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
    image = Path(generation["path"]) / f"volume.{image_format}"
    assert image.stat().st_blocks * 512 < 48 << 20  # zero blocks were not written
    manifest = json.loads((Path(generation["path"]) / "manifest.json").read_text())
    assert manifest["host"] == "lab"
    assert manifest["source"]["snapshot_kind"] == "classic"
    assert run_gfs("verify", "--config", str(config)).exit_code == 0
    restored = tmp_path / "restored.raw"
    result = run_gfs("restore", "db", "--config", str(config), "--to", str(restored))
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == expected


def test_a_thin_lv_gets_a_thin_snapshot(
    remote_host: RemoteHost, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    name = f"thin{uuid.uuid4().hex[:6]}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-V", "64m", "-T", f"{VG}/thinpool", "-n", name])
    try:
        ok(remote_host, ["dd", "if=/dev/urandom", f"of=/dev/{VG}/{name}", "bs=1M", "count=8"])
        expected = ok(remote_host, ["sha256sum", f"/dev/{VG}/{name}"]).split()[0]
        target = mounts("tgt", kind="tmpfs", size_mb=128)
        config = lvm_config(tmp_path, target, remote_host, name)
        result = run_gfs("run", "--config", str(config))
        assert result.exit_code == 0, result.output
        (generation,) = listing(run_gfs("list", "--config", str(config), "--json"))
        path = Path(generation["path"])
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["source"]["snapshot_kind"] == "thin"
        assert hashlib.sha256((path / "volume.raw").read_bytes()).hexdigest() == expected
        # Kept as the next run's delta base (tests/system/test_lvm_thin.py).
        assert gfs_snapshots(remote_host) == [manifest["source"]["capture"]["snapshot"]]
    finally:
        for leftover in [*gfs_snapshots(remote_host), name]:
            remote_host.run(["lvremove", "-f", f"{VG}/{leftover}"])


def test_no_room_for_the_snapshot_fails_clearly(
    remote_host: RemoteHost, volume: str, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    filler = f"fill{uuid.uuid4().hex[:6]}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-l", "100%FREE", "-n", filler, VG])
    try:
        target = mounts("tgt", kind="tmpfs", size_mb=64)
        config = lvm_config(tmp_path, target, remote_host, volume)
        result = run_gfs("run", "--config", str(config))
        assert result.exit_code == 5
        assert f"volume group {VG} has too little free space" in result.stderr
        assert in_job_dir(target) == []
        assert gfs_snapshots(remote_host) == []
    finally:
        remote_host.run(["lvremove", "-f", f"{VG}/{filler}"])


def test_a_snapshot_that_overflows_during_the_export_is_never_published(
    remote_host: RemoteHost,
    volume: str,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gfs_backup.backends.lvm as backend

    real_copy = backend.copy_stream

    def overwrite_origin_then_copy(stream: BinaryIO, *args: object) -> object:
        # 80 MiB of new data in the origin: more than the 64 MiB copy-on-write space.
        ok(
            remote_host,
            [
                "dd",
                "if=/dev/urandom",
                f"of=/dev/{VG}/{volume}",
                "bs=1M",
                "count=80",
                "oflag=direct",
            ],
        )
        return real_copy(stream, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(backend, "copy_stream", overwrite_origin_then_copy)
    target = mounts("tgt", kind="tmpfs", size_mb=256)
    config = lvm_config(tmp_path, target, remote_host, volume, 'snapshot_size = "64M"\n')
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 5, result.output
    assert "overflowed and is invalid" in result.stderr
    assert in_job_dir(target) == []
    assert gfs_snapshots(remote_host) == []


def test_a_dropped_connection_mid_export_fails_and_the_next_run_removes_the_snapshot(
    remote_host: RemoteHost, volume: str, mounts: Mounter, tmp_path: Path
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=256)
    config = lvm_config(tmp_path, target, remote_host, volume)
    args = ("run", "--force", "--config", str(config))

    def streaming() -> bool:
        partials = list((target / "db").glob(".partial-*/volume.raw"))
        return bool(partials) and partials[0].stat().st_size > 0

    failed, elapsed = run_cutting_the_link(remote_host, args, streaming)
    assert failed.returncode == 5, failed.stderr
    assert elapsed < 180, f"gfs hung {elapsed:.0f} s on a dead connection"
    assert "Traceback" not in failed.stderr
    assert [p for p in (target / "db").iterdir() if not p.name.startswith(".")] == []
    assert len(gfs_snapshots(remote_host)) == 1  # the next run removes it
    healed = gfs_subprocess(*args)
    assert healed.returncode == 0, healed.stderr
    assert "removed snapshot" in healed.stderr
    assert gfs_snapshots(remote_host) == []


def test_hostile_volume_names_are_refused_before_anything_runs(
    remote_host: RemoteHost, mounts: Mounter, tmp_path: Path, run_gfs: RunGfs
) -> None:
    target = mounts("tgt", kind="tmpfs", size_mb=16)
    config = lvm_config(tmp_path, target, remote_host, "x;touch /tmp/gfs-pwned")
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 3
    assert "job[db].volume: 'gfslab/x;touch /tmp/gfs-pwned' is not VG/LV" in result.stderr
    assert remote_host.run(["test", "-e", "/tmp/gfs-pwned"]).returncode == 1
