"""files jobs on a remote host: the nested lab host (a directory inside a btrfs subvolume on
an LV, sshd, python3, its NFS 4.2 mount of a btrfs export) is the host; gfs runs here. The
tree is read, linked to the previous generation, checked and restored on that host by gfs's
own tree code (copying/treeagent.py); only entries and progress cross SSH. Restores are
judged against the source by rsync there (-aHAX --checksum --itemize-changes), over a tree
holding every kind of object."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.fixtures import remote_host
from tests.lab.remote_host import RemoteHost
from tests.lab.remote_image import NFS_EXPORT, NFS_MOUNT
from tests.system.helpers import cut_then_heal, gfs_subprocess
from tests.system.test_remote_target import TRAFFIC_RE, ok, policy

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["remote_host"]

VG = "gfslab"
MOUNT = "/srv/fsrc"
DATA = f"{MOUNT}/vol/data"  # the job's path: a directory inside the subvolume `vol`
JOB = "docs"
# Every kind of object: data, hard links, a symlink and a dangling one, a sparse file, an
# empty file, a fifo, a device node, odd names (newline, not UTF-8, a leading dash),
# owners, modes, user xattrs (on the root too), an ACL and a default ACL, a capability,
# a file whose mtime is old, and the root directory's own mode and time.
MAKE_TREE = r"""
set -e
cd "$1"
mkdir -p "dir/odd name" -- -dash
dd if=/dev/urandom of=data bs=1M count=4 status=none
printf 'hello\n' > "dir/odd name/a"
ln "dir/odd name/a" hard
ln -s data link
ln -s /nowhere/at/all dangling
truncate -s 20M sparse
printf x | dd of=sparse bs=1 seek=10000000 conv=notrunc status=none
: > empty
mkfifo fifo
mknod char c 1 3
printf 'same size A' > rewritten
printf old > aged
chown 1234:99 aged
chmod 640 aged
touch -d 2001-02-03 aged rewritten
setfacl -m u:1234:r-x,g:99:rw- data
setfacl -d -m u:1234:rwx dir
printf 'tool' > ./-dash/capfile
setcap cap_net_raw+ep ./-dash/capfile
python3 - <<'EOF'
import os
os.setxattr("data", "user.note", b"v\x00\xff")
os.setxattr(".", "user.root", b"r")
for name in (b"line\nbreak", b"latin\xe9", "ünïcode ✓".encode()):
    with open(name, "wb") as f:
        f.write(name)
EOF
chmod 750 .
touch -d 2010-01-01 dir .
"""


@pytest.fixture
def tree(remote_host: RemoteHost) -> Iterator[str]:
    """A btrfs filesystem on a fresh LV of the lab host mounted at MOUNT, with the subvolume
    `vol` holding DATA (MAKE_TREE). Removed at the end, with the job's generations."""
    name = f"f{uuid.uuid4().hex[:8]}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-Zy", "-Wy", "-L", "256m", "-n", name, VG])
    ok(remote_host, ["mkfs.btrfs", "-q", "-f", f"/dev/{VG}/{name}"])
    ok(remote_host, ["mkdir", "-p", MOUNT])
    ok(remote_host, ["mount", f"/dev/{VG}/{name}", MOUNT])
    ok(remote_host, ["btrfs", "subvolume", "create", f"{MOUNT}/vol"])
    ok(remote_host, ["mkdir", DATA])
    ok(remote_host, ["sh", "-c", MAKE_TREE, "sh", DATA])
    yield DATA
    remote_host.run(["rm", "-rf", f"{NFS_MOUNT}/{JOB}"])  # through the client: coherent
    remote_host.run(["sh", "-c", f"btrfs subvolume delete {MOUNT}/vol/.gfs-snapshots/* || true"])
    remote_host.run(["umount", MOUNT])
    remote_host.run(["lvremove", "-f", f"{VG}/{name}"])


def config_for(path: Path, host: RemoteHost, extra_target: str = "") -> Path:
    path.write_text(
        f"state_dir = {json.dumps(str(path.parent / 'state'))}\n"
        f'[target.nas]\npath = "{NFS_MOUNT}"\nhost = "lab"\n{extra_target}'
        f"[hosts.lab]\naddress = {json.dumps(host.address)}\nport = {host.port}\n"
        f"user = {json.dumps(host.user)}\n"
        f"identity_file = {json.dumps(str(host.identity_file))}\n"
        f"known_hosts = {json.dumps(str(host.known_hosts_file))}\n"
        f'[[job]]\nname = "{JOB}"\nkind = "files"\nhost = "lab"\npath = "{DATA}"\n'
        f'scratch_dir = "{MOUNT}"\n' + policy(3),
        encoding="utf-8",
    )
    return path


def rsync_differences(host: RemoteHost, source: str, restored: str) -> list[str]:
    """What rsync would change to make `restored` equal `source` (contents by checksum,
    hard links, ACLs, xattrs, owners, modes, times to the nanosecond, devices, fifos, and
    objects only `restored` has): [] when equal."""
    done = host.run(
        ["rsync", "-aHAX", "--numeric-ids", "--checksum", "--dry-run", "--itemize-changes",
         "--delete", "--modify-window=-1", f"{source}/", f"{restored}/"],
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def generations(config: Path) -> list[dict[str, object]]:
    listed = gfs_subprocess("list", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    found: list[dict[str, object]] = json.loads(listed.stdout)["jobs"][0]["generations"]
    return found


def manifest_of(host: RemoteHost, generation: dict[str, object]) -> dict[str, object]:
    found: dict[str, object] = json.loads(ok(host, ["cat", f"{generation['path']}/manifest.json"]))
    return found


def restore(host: RemoteHost, config: Path, generation: str, to: str) -> None:
    done = gfs_subprocess(
        "restore", JOB, "--generation", generation, "--config", str(config), "--to", to
    )
    assert done.returncode == 0, done.stderr
    assert "on host lab" in done.stderr


def test_a_remote_files_job_exports_links_verifies_and_restores_on_its_host(
    remote_host: RemoteHost, tree: str, tmp_path: Path
) -> None:
    config = config_for(tmp_path / "gfs.toml", remote_host)
    first = gfs_subprocess("--debug", "run", "--config", str(config))
    assert first.returncode == 0, first.stderr
    received = sum(int(r) for r, _sent in TRAFFIC_RE.findall(first.stderr))
    assert 0 < received < 1 << 20, first.stderr  # 4 MiB read and written on the host
    (one,) = generations(config)
    assert one["host"] == "lab"
    manifest = manifest_of(remote_host, one)
    source = manifest["source"]
    assert isinstance(source, dict) and manifest["point_in_time"] is True
    assert source["copied_files"] >= 8 and source["linked_files"] == 0
    restore(remote_host, config, str(one["id"]), f"{MOUNT}/r1")
    assert rsync_differences(remote_host, tree, f"{MOUNT}/r1") == []

    # Same size, old mtime: only its ctime shows the change. One file added, one removed.
    rewrite = 'printf "same size B" > rewritten && touch -d 2001-02-03 rewritten'
    ok(
        remote_host,
        ["sh", "-c", f'cd "$1" && {rewrite} && echo fresh > fresh-file && rm aged', "sh", tree],
    )
    # The judge sees each of those three changes against the first restore.
    stale = rsync_differences(remote_host, tree, f"{MOUNT}/r1")
    assert any(line.endswith(" rewritten") and line.startswith(">fc") for line in stale), stale
    assert any(line.endswith(" fresh-file") for line in stale), stale
    assert "*deleting   aged" in stale, stale
    time.sleep(1.1)  # a new generation id
    second = gfs_subprocess("run", "--force", "--config", str(config))
    assert second.returncode == 0, second.stderr
    one, two = generations(config)
    source = manifest_of(remote_host, two)["source"]
    assert isinstance(source, dict)
    assert source["linked_files"] >= 6 and source["copied_files"] == 2, source  # rewritten, new
    same = [f"{NFS_EXPORT}/{JOB}/{g['id']}/data/data" for g in (one, two)]
    inodes = ok(remote_host, ["stat", "-c", "%i", *same]).split()
    assert inodes[0] == inodes[1]  # the unchanged file is a hard link to the first generation
    restore(remote_host, config, str(two["id"]), f"{MOUNT}/r2")
    assert rsync_differences(remote_host, tree, f"{MOUNT}/r2") == []
    assert ok(remote_host, ["cat", f"{MOUNT}/r2/rewritten"]) == "same size B"  # not "A"

    verify = gfs_subprocess("verify", "--config", str(config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Damage the second generation's copy of `fresh-file` (its own, not linked) through the mount.
    damaged = f"{two['path']}/data/fresh-file"
    ok(remote_host, ["sh", "-c", 'printf X | dd of="$1" conv=notrunc status=none', "sh", damaged])
    verify = gfs_subprocess("verify", "--config", str(config))
    assert verify.returncode != 0, verify.stdout + verify.stderr
    assert "fresh-file" in verify.stdout + verify.stderr and "Traceback" not in verify.stderr

    # A restore into a path that exists is refused on the host, with nothing written.
    refused = gfs_subprocess("restore", JOB, "--config", str(config), "--to", f"{MOUNT}/r1")
    assert refused.returncode != 0 and "already exists" in refused.stderr

    # Drills restore and check on the host too: the damaged generation fails, naming the
    # file; the first passes and its result is in its manifest; no scratch is left there.
    drill = gfs_subprocess("drill", JOB, "--config", str(config))
    assert drill.returncode != 0 and "fresh-file" in drill.stderr, drill.stderr
    drill = gfs_subprocess("drill", JOB, "--generation", str(one["id"]), "--config", str(config))
    assert drill.returncode == 0, drill.stderr
    drills = manifest_of(remote_host, one)["drills"]
    assert isinstance(drills, list) and drills[-1]["outcome"] == "pass", drills
    assert ok(remote_host, ["sh", "-c", f"ls -A {MOUNT} | grep -c gfs-drill || true"]) == "0\n"


def test_a_dropped_connection_while_the_host_exports_is_cleaned_up_next_run(
    remote_host: RemoteHost, tree: str, tmp_path: Path
) -> None:
    """The link goes down while the host writes the tree into its target: the run fails
    within its io_timeout, and the next run removes the partial generation and the
    snapshot, then backs up; no restore of it differs from the source."""
    ok(remote_host, ["dd", "if=/dev/urandom", f"of={tree}/big", "bs=1M", "count=48"])
    config = config_for(tmp_path / "gfs.toml", remote_host, "io_timeout = 20\n")
    args = ("run", "--force", "--config", str(config))

    def partial_written() -> bool:
        probe = f"test -e {NFS_EXPORT}/{JOB}/.partial-*/data"
        return remote_host.run(["sh", "-c", probe]).returncode == 0

    name = cut_then_heal(
        remote_host, args, partial_written, ["pgrep", "-x", "python3"], f"{NFS_EXPORT}/{JOB}"
    )
    assert ok(remote_host, ["ls", "-A", f"{MOUNT}/vol/.gfs-snapshots"]).split() == []
    restore(remote_host, config, name, f"{MOUNT}/r3")
    assert rsync_differences(remote_host, tree, f"{MOUNT}/r3") == []
