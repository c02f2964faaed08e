"""btrfs jobs on a remote host: the nested lab host (real btrfs on an LV, sshd, its NFS 4.2
mount of a btrfs export) is the host; gfs runs here. To the target that host mounts, the
`btrfs send` stream stays there (only progress crosses SSH); to a target mounted here, it
crosses SSH. Both restore on that host, judged against the source with GNU diff there."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.fixtures import remote_host
from tests.lab.remote_host import RemoteHost
from tests.lab.remote_image import NFS_EXPORT, NFS_MOUNT
from tests.system.conftest import Mounter
from tests.system.helpers import gfs_subprocess
from tests.system.test_remote_target import TRAFFIC_RE, ok, policy

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["remote_host"]

VG = "gfslab"
SOURCE = "/srv/src"


@pytest.fixture
def source(remote_host: RemoteHost) -> Iterator[str]:
    """A btrfs filesystem on a fresh LV of the lab host, mounted at SOURCE, holding the
    subvolume `vol` with a tree: data, a hard link, a symlink, a sparse file, an empty
    file, a file rewritten with an old mtime. Removed at the end."""
    name = f"b{uuid.uuid4().hex[:8]}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-Zy", "-Wy", "-L", "160m", "-n", name, VG])
    ok(remote_host, ["mkfs.btrfs", "-q", "-f", f"/dev/{VG}/{name}"])
    ok(remote_host, ["mkdir", "-p", SOURCE])
    ok(remote_host, ["mount", f"/dev/{VG}/{name}", SOURCE])
    vol = f"{SOURCE}/vol"
    ok(remote_host, ["btrfs", "subvolume", "create", vol])
    script = (
        'set -e; cd "$1"; mkdir -p "dir/odd name"; '
        "dd if=/dev/urandom of=data bs=1M count=6 status=none; "
        'printf "hello\\n" > "dir/odd name/a"; ln "dir/odd name/a" hard; ln -s data link; '
        "truncate -s 20M sparse; printf x | dd of=sparse bs=1 seek=10000000 conv=notrunc "
        "status=none; : > empty; printf old > aged; touch -d 2001-02-03 aged; chmod 640 aged"
    )
    ok(remote_host, ["sh", "-c", script, "sh", vol])
    yield vol
    remote_host.run(["sh", "-c", f"btrfs subvolume delete {SOURCE}/vol/.gfs-snapshots/* || true"])
    remote_host.run(["umount", SOURCE])
    remote_host.run(["lvremove", "-f", f"{VG}/{name}"])


def config_for(path: Path, host: RemoteHost, target: str, target_host: str) -> Path:
    host_line = f'host = "{target_host}"\n' if target_host != "local" else "require_nfs = false\n"
    path.write_text(
        f"state_dir = {json.dumps(str(path.parent / 'state'))}\n"
        f"[target.nas]\npath = {json.dumps(target)}\n{host_line}"
        f"[hosts.lab]\naddress = {json.dumps(host.address)}\nport = {host.port}\n"
        f"user = {json.dumps(host.user)}\n"
        f"identity_file = {json.dumps(str(host.identity_file))}\n"
        f"known_hosts = {json.dumps(str(host.known_hosts_file))}\n"
        f'[[job]]\nname = "home"\nkind = "btrfs"\nhost = "lab"\nsubvolume = "{SOURCE}/vol"\n'
        + policy(3),
        encoding="utf-8",
    )
    return path


def same_tree(host: RemoteHost, first: str, second: str) -> None:
    """GNU diff (contents, symlinks) and a listing of kinds, modes, sizes, links and
    mtimes, compared on the host."""
    diff = host.run(["diff", "-r", "--no-dereference", first, second])
    assert diff.returncode == 0, diff.stdout + diff.stderr
    listing = ["find", ".", "-path", "./.gfs-snapshots", "-prune", "-o", "-printf"]
    form = "%y %m %s %n %T@ %p\\n"
    a = ok(host, ["sh", "-c", 'cd "$1" && shift && "$@" | sort', "sh", first, *listing, form])
    b = ok(host, ["sh", "-c", 'cd "$1" && shift && "$@" | sort', "sh", second, *listing, form])
    assert a == b


def test_a_remote_btrfs_job_to_the_hosts_own_target_and_back(
    remote_host: RemoteHost, source: str, tmp_path: Path
) -> None:
    config = config_for(tmp_path / "gfs.toml", remote_host, NFS_MOUNT, "lab")
    try:
        done = gfs_subprocess("--debug", "run", "--config", str(config))
        assert done.returncode == 0, done.stderr
        received = sum(int(r) for r, _sent in TRAFFIC_RE.findall(done.stderr))
        assert 0 < received < 1 << 20, done.stderr  # 6 MiB sent on the host, not here
        listed = gfs_subprocess("list", "--config", str(config), "--json")
        (generation,) = json.loads(listed.stdout)["jobs"][0]["generations"]
        manifest = json.loads(
            ok(remote_host, ["cat", f"{generation['path']}/manifest.json"])
        )
        assert manifest["host"] == "lab" and manifest["source"]["written_on"] == "lab"
        verify = gfs_subprocess("verify", "--config", str(config))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # No snapshot is left on the host (keep_snapshots 0 by default).
        assert ok(remote_host, ["ls", "-A", f"{source}/.gfs-snapshots"]).split() == []
        restored = f"{SOURCE}/restored"
        done = gfs_subprocess("restore", "home", "--config", str(config), "--to", restored)
        assert done.returncode == 0, done.stderr
        same_tree(remote_host, source, restored)
    finally:
        remote_host.run(["sh", "-c", f"btrfs subvolume delete {SOURCE}/restored || true"])
        remote_host.run(["rm", "-rf", f"{NFS_EXPORT}/home"])


def test_a_remote_btrfs_job_to_a_local_target_streams_over_ssh(
    remote_host: RemoteHost, source: str, mounts: Mounter, tmp_path: Path
) -> None:
    target = mounts("target", "btrfs", 256)
    config = config_for(tmp_path / "gfs.toml", remote_host, str(target), "local")
    try:
        done = gfs_subprocess("--debug", "run", "--config", str(config))
        assert done.returncode == 0, done.stderr
        received = sum(int(r) for r, _sent in TRAFFIC_RE.findall(done.stderr))
        assert received > 6 << 20, done.stderr  # the stream came here
        restored = f"{SOURCE}/restored"
        done = gfs_subprocess("restore", "home", "--config", str(config), "--to", restored)
        assert done.returncode == 0, done.stderr
        same_tree(remote_host, source, restored)
    finally:
        remote_host.run(["sh", "-c", f"btrfs subvolume delete {SOURCE}/restored || true"])
