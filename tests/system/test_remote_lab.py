"""The nested remote-host lab works: SSH with a pinned host key, real LVM, real NFS, faults.

These tests prove what later remote-backup tests build on: paramiko reaches the guest's sshd
only with the right host key; classic and thin LVM snapshots hold their origin's bytes;
/mnt/target is a kernel NFS mount of /srv/nfs; a stopped NFS server makes target I/O hang
and a restarted one lets it recover; a NIC whose link is down stalls an open SSH connection,
which carries on once the link is up again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko  # type: ignore[import-untyped,unused-ignore]
import pytest

from tests.lab.daemons import ProcessRecord, process_record
from tests.lab.errors import LabError
from tests.lab.fixtures import remote_host
from tests.lab.remote_host import (
    RemoteHost,
    known_hosts_line,
    reap_stale_remote_hosts,
    start_remote_host,
    write_record,
)
from tests.lab.remote_image import (
    NFS_EXPORT,
    NFS_MOUNT,
    THIN_POOL,
    VG_NAME,
    RemoteHostImage,
    SshKeys,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["remote_host"]  # used as a fixture

BOOT_LIMIT = 90.0
GNU_TOOLS = ("dd", "split", "sha256sum", "timeout", "stat", "mkdir", "mv", "rm", "cat", "find")
SBIN_TOOLS = (
    *("lvs", "lvcreate", "lvremove", "vgs", "pvcreate", "vgcreate", "lvconvert", "lvchange"),
    *("dmsetup", "thin_check", "mkfs.btrfs", "mkfs.ext4", "exportfs", "rpc.nfsd", "mount.nfs"),
)
BIN_TOOLS = ("btrfs", "qemu-img")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ok(host: RemoteHost, argv: list[str], timeout: float = 120.0) -> str:
    """stdout of `argv` in the guest; fails the test with stderr on a non-zero status."""
    done = host.run(argv, timeout=timeout)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}): {done.stderr.strip()}"
    return done.stdout


@pytest.fixture
def lv_names(remote_host: RemoteHost) -> Iterator[list[str]]:
    """Names of LVs a test creates in the lab VG; removed at the end (snapshots first)."""
    names: list[str] = []
    yield names
    for name in reversed(names):
        remote_host.run(["lvremove", "-q", "-y", f"{VG_NAME}/{name}"])


def test_remote_host_boots_to_ready_in_time(remote_host: RemoteHost) -> None:
    print(f"{remote_host.name}: boot to ready {remote_host.boot_seconds:.1f} s")
    assert remote_host.boot_seconds < BOOT_LIMIT, (
        f"boot to ready took {remote_host.boot_seconds:.1f} s (limit {BOOT_LIMIT:.0f} s); "
        f"console: {remote_host.console_log}"
    )
    warnings = [line for line in remote_host.console().splitlines() if "WARNING" in line]
    assert warnings == []


def test_ssh_with_the_known_hosts_file_works(remote_host: RemoteHost) -> None:
    client = remote_host.connect()
    try:
        _, stdout, _ = client.exec_command("id -u", timeout=60)
        assert stdout.read().decode().strip() == "0"
        with client.open_sftp() as sftp:
            assert sftp.stat(NFS_MOUNT).st_mode is not None
    finally:
        client.close()
    assert remote_host.known_hosts_file.read_text().split() == [
        f"[127.0.0.1]:{remote_host.port}",
        *remote_host.host_public_key.split(),
    ]


def _connect_expecting(host: RemoteHost, known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        host.address,
        port=host.port,
        username=host.user,
        key_filename=str(host.identity_file),
        look_for_keys=False,
        allow_agent=False,
        timeout=60,
    )
    return client


def test_a_wrong_or_unknown_host_key_is_rejected(remote_host: RemoteHost, tmp_path: Path) -> None:
    wrong_key = remote_host.image.keys.client_public_key  # a valid ed25519 key, not the host's
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(known_hosts_line(remote_host.address, remote_host.port, wrong_key) + "\n")
    with pytest.raises(paramiko.BadHostKeyException):
        _connect_expecting(remote_host, wrong)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _connect_expecting(remote_host, empty)


def test_gnu_and_lvm_tools_are_on_the_guest_path(remote_host: RemoteHost) -> None:
    tools = (*GNU_TOOLS, *BIN_TOOLS, *SBIN_TOOLS)
    script = 'for tool in "$@"; do command -v "$tool" || echo "missing:$tool"; done'
    found = ok(remote_host, ["sh", "-c", script, "sh", *tools]).split()
    assert found == [
        *(f"/usr/bin/{tool}" for tool in (*GNU_TOOLS, *BIN_TOOLS)),
        *(f"/usr/sbin/{tool}" for tool in SBIN_TOOLS),
    ]
    assert "GNU coreutils" in ok(remote_host, ["split", "--version"])
    assert "GNU findutils" in ok(remote_host, ["find", "--version"])
    for argv in (["qemu-img", "--version"], ["dmsetup", "version"], ["btrfs", "--version"]):
        ok(remote_host, argv)  # their libraries are all there
    assert "Driver version" in ok(remote_host, ["dmsetup", "version"])


def test_a_gfs_style_pipeline_runs_with_the_gnu_tools(remote_host: RemoteHost) -> None:
    """dd | split --filter writing chunks and their digests to the NFS target, as gfs does."""
    directory = f"{NFS_MOUNT}/{unique('pipeline')}"
    pipeline = (
        'set -o pipefail; mkdir -p "$1"'
        " && dd if=/dev/urandom bs=1M count=3 iflag=fullblock status=none"
        ' | tee "$1/whole" | split -b 1M -d --filter=\'tee "$FILE" | sha256sum >"$FILE.sha256"\''
        ' - "$1/chunk."'
    )
    try:
        ok(remote_host, ["bash", "-c", pipeline, "bash", directory])
        names = ok(remote_host, ["find", directory, "-type", "f", "-printf", "%f\\n"]).split()
        assert sorted(names) == [
            *(f"chunk.0{n}{suffix}" for n in range(3) for suffix in ("", ".sha256")),
            "whole",
        ]
        joined = ok(remote_host, ["sh", "-c", 'cat "$1"/chunk.0? | sha256sum', "sh", directory])
        assert joined.split()[0] == ok(remote_host, ["sha256sum", f"{directory}/whole"]).split()[0]
    finally:
        remote_host.run(["rm", "-rf", directory])


def test_btrfs_on_an_lv_with_a_readonly_snapshot(
    remote_host: RemoteHost, lv_names: list[str]
) -> None:
    volume, mountpoint = unique("btrfs"), f"/mnt/{unique('btrfs')}"
    ok(remote_host, ["lvcreate", "-q", "-y", "-L", "256m", "-n", volume, VG_NAME])
    lv_names.append(volume)
    ok(remote_host, ["mkfs.btrfs", "-q", f"/dev/{VG_NAME}/{volume}"])
    ok(remote_host, ["mkdir", "-p", mountpoint])
    ok(remote_host, ["mount", "-t", "btrfs", f"/dev/{VG_NAME}/{volume}", mountpoint])
    try:
        ok(remote_host, ["btrfs", "subvolume", "create", f"{mountpoint}/data"])
        ok(remote_host, ["sh", "-c", 'echo v1 >"$1/data/file"', "sh", mountpoint])
        ok(
            remote_host,
            ["btrfs", "subvolume", "snapshot", "-r", f"{mountpoint}/data", f"{mountpoint}/snap"],
        )
        ok(remote_host, ["sh", "-c", 'echo v2 >"$1/data/file"', "sh", mountpoint])
        assert ok(remote_host, ["cat", f"{mountpoint}/snap/file"]) == "v1\n"
    finally:
        remote_host.run(["umount", mountpoint])
        remote_host.run(["rmdir", mountpoint])


def test_classic_lvm_snapshot_holds_the_origin_bytes(
    remote_host: RemoteHost, lv_names: list[str]
) -> None:
    origin, snapshot = unique("origin"), unique("snap")
    ok(remote_host, ["lvcreate", "-q", "-y", "-L", "32m", "-n", origin, VG_NAME])
    lv_names.append(origin)
    origin_dev, snapshot_dev = f"/dev/{VG_NAME}/{origin}", f"/dev/{VG_NAME}/{snapshot}"
    ok(
        remote_host,
        ["dd", "if=/dev/urandom", f"of={origin_dev}", "bs=1M", "count=32", "oflag=direct"],
    )
    before = ok(remote_host, ["sha256sum", origin_dev]).split()[0]

    ok(
        remote_host,
        ["lvcreate", "-q", "-y", "-s", "-L", "16m", "-n", snapshot, f"{VG_NAME}/{origin}"],
    )
    lv_names.append(snapshot)
    ok(remote_host, ["dd", "if=/dev/zero", f"of={origin_dev}", "bs=1M", "count=4", "oflag=direct"])

    assert ok(remote_host, ["sha256sum", snapshot_dev]).split()[0] == before
    assert ok(remote_host, ["sha256sum", origin_dev]).split()[0] != before
    attributes = ok(remote_host, ["lvs", "--noheadings", "-o", "lv_attr", f"{VG_NAME}/{snapshot}"])
    assert attributes.strip().startswith("s")


def test_thin_lv_and_thin_snapshot(remote_host: RemoteHost, lv_names: list[str]) -> None:
    thin, snapshot = unique("thin"), unique("thinsnap")
    ok(
        remote_host,
        ["lvcreate", "-q", "-y", "-V", "64m", "-T", f"{VG_NAME}/{THIN_POOL}", "-n", thin],
    )
    lv_names.append(thin)
    thin_dev = f"/dev/{VG_NAME}/{thin}"
    ok(
        remote_host,
        ["dd", "if=/dev/urandom", f"of={thin_dev}", "bs=1M", "count=16", "oflag=direct"],
    )
    before = ok(remote_host, ["sha256sum", thin_dev]).split()[0]

    ok(remote_host, ["lvcreate", "-q", "-y", "-s", "-n", snapshot, f"{VG_NAME}/{thin}"])
    lv_names.append(snapshot)
    ok(remote_host, ["lvchange", "-q", "-a", "y", "-K", f"{VG_NAME}/{snapshot}"])
    ok(remote_host, ["dd", "if=/dev/zero", f"of={thin_dev}", "bs=1M", "count=4", "oflag=direct"])

    assert ok(remote_host, ["sha256sum", f"/dev/{VG_NAME}/{snapshot}"]).split()[0] == before
    pool = ok(remote_host, ["lvs", "--noheadings", "-o", "pool_lv", f"{VG_NAME}/{snapshot}"])
    assert pool.strip() == THIN_POOL


def test_target_is_an_nfs_mount_of_the_export(remote_host: RemoteHost) -> None:
    assert ok(remote_host, ["stat", "-f", "-c", "%T", NFS_MOUNT]).strip() == "nfs"
    mounts = ok(remote_host, ["cat", "/proc/mounts"]).splitlines()
    target = [line.split() for line in mounts if line.split()[1] == NFS_MOUNT]
    assert target and target[0][0] == "127.0.0.1:/" and target[0][2] == "nfs4"
    assert "vers=4.2" in target[0][3] and "hard" in target[0][3]
    name = unique("file")
    ok(remote_host, ["sh", "-c", f"echo hello >{NFS_MOUNT}/{name}"])
    try:
        assert ok(remote_host, ["cat", f"{NFS_EXPORT}/{name}"]) == "hello\n"
    finally:
        remote_host.run(["rm", "-f", f"{NFS_MOUNT}/{name}"])


def _target_write_works(host: RemoteHost, seconds: int) -> bool:
    name = unique("probe")
    done = host.run(["timeout", str(seconds), "touch", f"{NFS_MOUNT}/{name}"], timeout=seconds + 60)
    host.run(["rm", "-f", f"{NFS_EXPORT}/{name}"])
    return done.returncode == 0


def test_stopped_nfs_server_hangs_target_io_and_a_restart_recovers(
    remote_host: RemoteHost,
) -> None:
    assert _target_write_works(remote_host, 30)
    remote_host.stop_nfs_server()
    try:
        started = time.monotonic()
        done = remote_host.run(["timeout", "5", "stat", f"{NFS_MOUNT}/{unique('x')}"], timeout=90)
        assert done.returncode == 124, f"expected a hang, got {done}"  # 124: timeout killed it
        assert time.monotonic() - started >= 5
    finally:
        remote_host.start_nfs_server()
    deadline = time.monotonic() + 180
    while not _target_write_works(remote_host, 20):
        assert time.monotonic() < deadline, "the NFS mount did not recover within 180 s"
    print(f"NFS target usable again {time.monotonic() - deadline + 180:.1f} s after restart")


def test_link_down_stalls_an_open_ssh_connection_and_link_up_restores_it(
    remote_host: RemoteHost,
) -> None:
    client = remote_host.connect()
    try:
        _, stdout, _ = client.exec_command("echo before", timeout=60)
        assert stdout.read().decode() == "before\n"
        remote_host.set_link(False)
        try:
            with pytest.raises((paramiko.SSHException, socket.timeout, EOFError)):
                _, stdout, _ = client.exec_command("echo during", timeout=5)
                stdout.read()
        finally:
            remote_host.set_link(True)
        _, stdout, _ = client.exec_command("echo after", timeout=120)
        assert stdout.read().decode() == "after\n"
        assert client.get_transport().is_active()
    finally:
        client.close()


def test_run_reports_status_output_and_timeouts(remote_host: RemoteHost) -> None:
    done = remote_host.run(["sh", "-c", 'cat; echo "$1" >&2; exit 3', "sh", "it's"], input="in")
    assert (done.returncode, done.stdout, done.stderr) == (3, "in", "it's\n")
    with pytest.raises(subprocess.TimeoutExpired):
        remote_host.run(["sleep", "30"], timeout=2, expect_timeout=True)
    assert ok(remote_host, ["echo", "still", "usable"]) == "still usable\n"


def test_reaping_kills_the_guests_of_dead_sessions_only(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_owner = ProcessRecord("pytest", gone.pid, 0)
    live_owner = process_record("pytest", os.getpid())
    orphan = subprocess.Popen(["sleep", "120"])  # stands in for a crashed session's QEMU
    owned = subprocess.Popen(["sleep", "120"])
    try:
        records = tmp_path / "remote-hosts"
        for name, owner, process in (("orphan", dead_owner, orphan), ("owned", live_owner, owned)):
            record = process_record("qemu", process.pid)
            assert owner is not None and record is not None
            write_record(records / f"{name}.json", owner, record)

        reap_stale_remote_hosts(tmp_path)

        assert orphan.wait(timeout=30) == -signal.SIGKILL
        assert owned.poll() is None
        assert sorted(path.name for path in records.iterdir()) == ["owned.json"]
    finally:
        for process in (orphan, owned):
            process.kill()
            process.wait()


def test_a_guest_that_cannot_start_fails_with_the_reason_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    keys = SshKeys(tmp_path / "h", "ssh-ed25519 AAAAh", tmp_path / "c", "ssh-ed25519 AAAAc")
    broken = RemoteHostImage(tmp_path / "no-kernel", tmp_path / "no-initrd", "none", keys)
    state = tmp_path / "state"
    with pytest.raises(LabError, match="QEMU exited early"):
        start_remote_host(tmp_path / "run", broken, state_dir=state)
    assert list(state.glob("remote-hosts/*.json")) == []
