"""btrfs jobs on a remote host: the nested lab host (real btrfs on an LV, sshd, its NFS 4.2
mount of a btrfs export) is the host; gfs runs here. To the target that host mounts, the
`btrfs send` stream stays there (only progress crosses SSH); to a target mounted here, it
crosses SSH. Both restore on that host, judged against the source with GNU diff there."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.fixtures import remote_host
from tests.lab.remote_host import RemoteHost
from tests.lab.remote_image import NFS_EXPORT, NFS_MOUNT
from tests.system.conftest import Mounter
from tests.system.helpers import cut_then_heal, gfs_subprocess
from tests.system.test_remote_target import TRAFFIC_RE, ok, policy

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["remote_host"]

VG = "gfslab"
SOURCE = "/srv/src"
SEND_RUNNING = (
    'for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = btrfs ] && exit 0; done; exit 1'
)


@pytest.fixture
def source(remote_host: RemoteHost) -> Iterator[str]:
    """A btrfs filesystem on a fresh LV of the lab host, mounted at SOURCE, holding the
    subvolume `vol` with a tree: data, a hard link, a symlink, a sparse file, an empty
    file, a file rewritten with an old mtime. Removed at the end."""
    name = f"b{uuid.uuid4().hex[:8]}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-Zy", "-Wy", "-L", "256m", "-n", name, VG])
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


def restore_and_judge(host: RemoteHost, config: Path, source: str) -> None:
    """`gfs restore home --to SOURCE/restored` on the host, compared with the source."""
    restored = f"{SOURCE}/restored"
    done = gfs_subprocess("restore", "home", "--config", str(config), "--to", restored)
    assert done.returncode == 0, done.stderr
    same_tree(host, source, restored)


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
        manifest = json.loads(ok(remote_host, ["cat", f"{generation['path']}/manifest.json"]))
        assert manifest["host"] == "lab" and manifest["source"]["written_on"] == "lab"
        assert generation["host"] == "lab"
        text = gfs_subprocess("list", "--config", str(config)).stdout
        assert "from host lab" in text, text
        verify = gfs_subprocess("verify", "--config", str(config))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # No snapshot is left on the host (keep_snapshots 0 by default).
        assert ok(remote_host, ["ls", "-A", f"{source}/.gfs-snapshots"]).split() == []
        restore_and_judge(remote_host, config, source)
    finally:
        remote_host.run(["sh", "-c", f"btrfs subvolume delete {SOURCE}/restored || true"])
        remote_host.run(["rm", "-rf", f"{NFS_MOUNT}/home"])  # through the client: coherent


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
        restore_and_judge(remote_host, config, source)
    finally:
        remote_host.run(["sh", "-c", f"btrfs subvolume delete {SOURCE}/restored || true"])


def test_a_dropped_connection_while_the_host_writes_the_stream_is_cleaned_up_next_run(
    remote_host: RemoteHost, source: str, tmp_path: Path
) -> None:
    """The link to the host goes down while `btrfs send` writes into its own target: the
    run fails within its io_timeout, and the next run removes the partial generation and
    the snapshot, then backs up."""
    ok(remote_host, ["dd", "if=/dev/urandom", f"of={source}/big", "bs=1M", "count=64"])
    config = config_for(tmp_path / "gfs.toml", remote_host, NFS_MOUNT, "lab")
    config.write_text(
        config.read_text().replace('host = "lab"\n', 'host = "lab"\nio_timeout = 20\n', 1)
    )
    args = ("run", "--force", "--config", str(config))
    partials = f"{NFS_EXPORT}/home"

    def stream_created() -> bool:
        """The stream's file exists on the server (created at once; its size shows only as
        the NFS client writes back): long before its result can reach gfs."""
        probe = f"test -e {partials}/.partial-*/subvolume.btrfs"
        return remote_host.run(["sh", "-c", probe]).returncode == 0

    try:
        cut_then_heal(remote_host, args, stream_created, ["sh", "-c", SEND_RUNNING], partials)
        assert ok(remote_host, ["ls", "-A", f"{source}/.gfs-snapshots"]).split() == []
    finally:
        remote_host.run(["rm", "-rf", f"{NFS_MOUNT}/home"])


def test_a_host_that_is_down_fails_only_its_own_jobs(mounts: Mounter, tmp_path: Path) -> None:
    """A remote btrfs job whose host does not answer (nothing listens on its port) fails;
    a local job of the same run goes on: exit 4, and nothing is left on the target."""
    target = mounts("target", "btrfs", 256)
    local = mounts("local", "btrfs", 256)
    subprocess.run(
        ["btrfs", "subvolume", "create", str(local / "vol")], check=True, capture_output=True
    )
    (local / "vol" / "file").write_text("data\n")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "gfs.toml"
    config.write_text(
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        f"[target.usb]\npath = {json.dumps(str(target))}\nrequire_nfs = false\n"
        f'[hosts.down]\naddress = "127.0.0.1"\nport = 9\n'
        f"identity_file = {json.dumps(str(key))}\n"
        f"known_hosts = {json.dumps(str(tmp_path / 'known_hosts'))}\n"
        f'[[job]]\nname = "far"\nkind = "btrfs"\nhost = "down"\nsubvolume = "/srv/x"\n'
        + policy(3)
        + f'[[job]]\nname = "near"\nkind = "btrfs"\nsubvolume = "{local / "vol"}"\n'
        + policy(3),
        encoding="utf-8",
    )
    done = gfs_subprocess("run", "--config", str(config))
    assert done.returncode == 4, done.stderr
    assert "job far: failed:" in done.stderr and "connection refused" in done.stderr
    assert "job near: done" in done.stderr
    assert sorted(p.name for p in target.iterdir()) == ["near"]
