"""A target that only the remote host mounts: the nested lab guest has the LVM volume group
and mounts the NFSv4.2 share at NFS_MOUNT; gfs runs here, and an lvm job on that host exports
there in one pipeline, so the image never passes through this machine."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RunGfs
from tests.lab.fixtures import remote_host
from tests.lab.remote_host import RemoteHost
from tests.lab.remote_image import NFS_EXPORT, NFS_MOUNT
from tests.system.helpers import gfs_subprocess, listing

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["remote_host"]

VG = "gfslab"
MIB = 1 << 20
TRAFFIC_RE = re.compile(r"host lab: (\d+) bytes of command output received, (\d+) bytes")
DONE_RE = re.compile(r"done: generation \S+, (\d+) bytes in ([\d.]+) s")
COPIED_RE = re.compile(r"copied \d+ bytes .*MiB/s\)")


def policy(keep_last: int) -> str:
    return (
        '[job.policy]\nsemantics = "restic"\ntimezone = "UTC"\nschedule = "daily"\n'
        f"[job.policy.retention]\nkeep-last = {keep_last}\n"
    )


def ok(host: RemoteHost, argv: list[str], timeout: float = 300) -> str:
    done = host.run(argv, timeout=timeout)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def gfs_snapshots(host: RemoteHost) -> list[str]:
    names = ok(host, ["lvs", "--noheadings", "-o", "lv_name", VG]).split()
    return [name for name in names if name.startswith("gfs-")]


@dataclass
class Setup:
    """One test's job on the lab host: its LV, its name, its config."""

    host: RemoteHost
    volume: str
    job: str
    config: Path

    @property
    def job_dir(self) -> str:
        return f"{NFS_MOUNT}/{self.job}"

    def entries(self) -> list[str]:
        """The job directory on the NFS server's side (never hangs on a stopped nfsd)."""
        done = self.host.run(["ls", "-A", f"{NFS_EXPORT}/{self.job}"])
        return sorted(done.stdout.split()) if done.returncode == 0 else []

    def lv_sha256(self) -> str:
        return ok(self.host, ["sha256sum", f"/dev/{VG}/{self.volume}"]).split()[0]


def write_config(
    path: Path, host: RemoteHost, job: str, volume: str, target: str, extra: str = ""
) -> Path:
    path.write_text(
        f"state_dir = {json.dumps(str(path.parent / 'state'))}\n"
        f'[target.nas]\npath = {json.dumps(target)}\nhost = "lab"\n{extra}'
        f"[hosts.lab]\naddress = {json.dumps(host.address)}\nport = {host.port}\n"
        f"user = {json.dumps(host.user)}\n"
        f"identity_file = {json.dumps(str(host.identity_file))}\n"
        f"known_hosts = {json.dumps(str(host.known_hosts_file))}\n"
        f'[[job]]\nname = "{job}"\nkind = "lvm"\nhost = "lab"\n'
        f"volume = {json.dumps(f'{VG}/{volume}')}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def make_setup(remote_host: RemoteHost, tmp_path: Path) -> Iterator[object]:
    """make_setup(size_mib, data_mib, keep_last, target_extra, target) -> Setup: a fresh LV
    with `data_mib` of random data at offset 8 MiB (the rest zero), a unique job name;
    the LV, gfs snapshots and the job directory on the NFS export are removed at the end."""
    made: list[Setup] = []

    def make(
        size_mib: int = 96,
        data_mib: int = 40,
        keep_last: int = 3,
        target_extra: str = "",
        target: str = NFS_MOUNT,
    ) -> Setup:
        tag = uuid.uuid4().hex[:8]
        volume, job = f"t{tag}", f"db-{tag}"
        ok(
            remote_host,
            ["lvcreate", "-q", "-y", "-Zy", "-Wy", "-L", f"{size_mib}m", "-n", volume, VG],
        )
        device = f"/dev/{VG}/{volume}"
        ok(remote_host, ["dd", "if=/dev/zero", f"of={device}", "bs=1M", f"count={size_mib}"])
        ok(
            remote_host,
            ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", f"count={data_mib}", "seek=8"],
        )
        config = write_config(
            tmp_path / f"{job}.toml", remote_host, job, volume, target, target_extra
        )
        config.write_text(config.read_text() + policy(keep_last))
        made.append(Setup(remote_host, volume, job, config))
        return made[-1]

    try:
        yield make
    finally:
        for setup in made:
            remote_host.run(["rm", "-rf", f"{NFS_EXPORT}/{setup.job}"])
            for leftover in [*gfs_snapshots(remote_host), setup.volume]:
                remote_host.run(["lvremove", "-f", f"{VG}/{leftover}"])


def ssh_bytes_received(stderr: str) -> int:
    found = TRAFFIC_RE.findall(stderr)
    assert found, f"no SSH traffic line in: {stderr[-2000:]}"
    return sum(int(received) for received, _ in found)


def test_an_lv_is_exported_on_its_host_to_its_nfs_target_verified_restored_pruned(
    make_setup: object, run_gfs: RunGfs, tmp_path: Path
) -> None:
    setup = make_setup(keep_last=1)  # type: ignore[operator]
    config = str(setup.config)
    expected = setup.lv_sha256()
    preview = run_gfs("run", "--dry-run", "--config", config)
    assert preview.exit_code == 0, preview.output
    assert setup.entries() == [] and gfs_snapshots(setup.host) == []  # dry-run wrote nothing
    started = time.monotonic()
    first = gfs_subprocess("run", "--config", config)
    elapsed = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    received = ssh_bytes_received(first.stderr)
    assert received < 1 * MIB, f"{received} bytes came over SSH for a 96 MiB image"
    done = DONE_RE.search(first.stderr)
    copied = COPIED_RE.search(first.stderr)
    print(f"export run: {elapsed:.1f} s, {received} bytes over SSH; {done and done.group(0)}")
    print(f"the copy on the host: {copied and copied.group(0)}")
    assert gfs_snapshots(setup.host) == []
    (generation,) = listing(run_gfs("list", "--config", config, "--json"))
    image = f"{generation['path']}/volume.raw"
    assert image.startswith(f"{NFS_MOUNT}/{setup.job}/")
    assert not Path(generation["path"]).exists()  # no copy on this machine
    manifest = json.loads(ok(setup.host, ["cat", f"{generation['path']}/manifest.json"]))
    assert manifest["digest_algorithm"] == "sha256"
    assert manifest["files"] == [{"path": "volume.raw", "size": 96 * MIB, "digest": expected}]
    assert manifest["verify"][-1]["result"] == "ok"  # verified after the export, remotely
    size, blocks = ok(setup.host, ["stat", "-c", "%s %b", image]).split()
    assert int(size) == 96 * MIB and int(blocks) * 512 < 48 * MIB  # holes stayed holes
    started = time.monotonic()
    assert run_gfs("verify", "--config", config).exit_code == 0
    print(f"gfs verify (sha256sum on the host): {time.monotonic() - started:.1f} s")
    status = json.loads(run_gfs("status", "--config", config, "--json").stdout)
    assert status["jobs"][0]["generations"] == 1, status
    assert not [w for w in status["jobs"][0]["warnings"] if "NFS" in w or "mount" in w], status
    assert setup.job in run_gfs("plan", setup.job, "--config", config).stdout
    restored = tmp_path / "restored.raw"
    result = run_gfs("restore", setup.job, "--config", config, "--to", str(restored))
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == expected
    time.sleep(1.1)  # a new generation id (one per second)
    second = gfs_subprocess("run", "--force", "--config", config)
    assert second.returncode == 0, second.stderr
    (newest,) = listing(run_gfs("list", "--config", config, "--json"))  # keep-last = 1
    assert newest["id"] != generation["id"]
    assert setup.entries() == [newest["id"]]  # the old one is gone, no leftovers
    ok(
        setup.host,
        [
            "sh",
            "-c",
            f"printf x | dd of={newest['path']}/volume.raw bs=1 seek=12345678 conv=notrunc",
        ],
    )
    damaged = run_gfs("verify", "--config", config)
    assert damaged.exit_code == 5, damaged.output
    assert "checksum mismatch" in damaged.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("iflag=direct status=none", "iflag=direct count=10 status=none"), "short read or write"),
        (('dd if="$dev"', 'dd if="$dev.missing"'), ".missing': No such file or directory"),
    ],
)
def test_a_short_or_failed_copy_fails_clearly_and_leaves_nothing(
    change: tuple[str, str],
    message: str,
    make_setup: object,
    run_gfs: RunGfs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gfs_backup.copying.hostcopy as hostcopy

    assert change[0] in hostcopy.EXPORT_SCRIPT
    monkeypatch.setattr(hostcopy, "EXPORT_SCRIPT", hostcopy.EXPORT_SCRIPT.replace(*change))
    setup = make_setup()  # type: ignore[operator]
    result = run_gfs("run", "--config", str(setup.config))
    assert result.exit_code == 5, result.output
    (line,) = [line for line in result.stderr.splitlines() if "failed:" in line]
    assert message in line and "on host lab" in line, line
    assert setup.entries() == []  # the partial export was removed
    assert gfs_snapshots(setup.host) == []


@pytest.mark.parametrize("where", ["plain-directory", "tmpfs"])
def test_a_remote_target_that_is_not_an_nfs_mount_is_refused_with_nothing_written(
    where: str, make_setup: object, remote_host: RemoteHost
) -> None:
    path = f"/tmp/gfs-target-{uuid.uuid4().hex[:8]}"
    ok(remote_host, ["mkdir", path])
    if where == "tmpfs":
        ok(remote_host, ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", path])
    try:
        setup = make_setup(target=path)  # type: ignore[operator]
        result = gfs_subprocess("run", "--config", str(setup.config))
        assert result.returncode == 5, result.stderr
        if where == "tmpfs":
            assert f"target nas ({path} on host lab) is tmpfs, not NFS" in result.stderr
        else:
            assert f"target nas ({path} on host lab) is not a mounted filesystem" in result.stderr
        assert ok(remote_host, ["ls", "-A", path]) == ""
        assert gfs_snapshots(remote_host) == []
    finally:
        if where == "tmpfs":
            remote_host.run(["umount", path])
        remote_host.run(["rmdir", path])


def test_nfs_server_stopped_mid_export_fails_in_bounded_time_and_the_next_run_heals(
    make_setup: object, remote_host: RemoteHost, run_gfs: RunGfs
) -> None:
    io_timeout = 15
    setup = make_setup(  # type: ignore[operator]
        size_mib=512, data_mib=480, target_extra=f"io_timeout = {io_timeout}\n"
    )
    stopped = threading.Event()
    stopped_at: list[float] = []

    def stop_nfs_once_the_image_grows() -> None:
        deadline = time.monotonic() + 300
        pattern = f"{NFS_EXPORT}/{setup.job}/.partial-*/volume.raw"
        while time.monotonic() < deadline:
            done = remote_host.run(["sh", "-c", f"stat -c %s {pattern}"])
            if done.returncode == 0 and int(done.stdout.split()[0]) > 0:
                remote_host.stop_nfs_server()
                stopped_at.append(time.monotonic())
                stopped.set()
                return
            time.sleep(0.2)

    stopper = threading.Thread(target=stop_nfs_once_the_image_grows)
    stopper.start()
    try:
        started = time.monotonic()
        failed = gfs_subprocess("run", "--config", str(setup.config))
        elapsed = time.monotonic() - started
        stopper.join()
        assert stopped.is_set(), f"the export ended before the NFS server was stopped: {failed}"
        after_stop = started + elapsed - stopped_at[0]
        reason = [line for line in failed.stderr.splitlines() if "stopped answering" in line]
        print(
            f"gfs failed {elapsed:.1f} s after its start, {after_stop:.1f} s after nfsd "
            f"stopped (io_timeout {io_timeout} s): {reason}"
        )
        assert failed.returncode == 5, failed.stderr
        assert "stopped answering" in failed.stderr and "NFS server down" in failed.stderr
        assert "Traceback" not in failed.stderr
        assert elapsed < 240, f"gfs took {elapsed:.0f} s on a stopped NFS server"
        assert [name for name in setup.entries() if not name.startswith(".")] == []
        assert gfs_snapshots(remote_host) == []  # the pipeline was killed, the LV freed
    finally:
        stopper.join()
        remote_host.start_nfs_server()
    healed = _run_until_the_mount_recovers(setup.config)
    assert "removed leftover partial" in healed
    done, copied = DONE_RE.search(healed), COPIED_RE.search(healed)
    print(f"after the restart: {done and done.group(0)}; {ssh_bytes_received(healed)} B over SSH")
    print(f"the copy on the host: {copied and copied.group(0)}")
    (generation,) = listing(run_gfs("list", "--config", str(setup.config), "--json"))
    assert setup.entries() == [generation["id"]]
    assert gfs_snapshots(remote_host) == []


def _run_until_the_mount_recovers(config: Path) -> str:
    """`gfs run --force` until it succeeds (the NFS client needs its grace time back);
    returns the stderr of every attempt."""
    deadline = time.monotonic() + 240
    logs = ""
    while True:
        result = gfs_subprocess("run", "--force", "--config", str(config))
        logs += result.stderr
        if result.returncode == 0:
            return logs
        assert time.monotonic() < deadline, f"no successful run after the restart: {result.stderr}"
        time.sleep(5)


def ext4_image(folder: Path, mib: int, broken: bool) -> Path:
    """An ext4 image of `mib` MiB holding a few files; `broken`: its root directory's inode
    cleared (debugfs clri), so a filesystem check must find errors."""
    content = folder / "content"
    (content / "etc").mkdir(parents=True, exist_ok=True)
    (content / "etc" / "hostname").write_text("db01\n")
    (content / "table.dat").write_bytes(bytes(range(256)) * 8192)
    image = folder / ("broken.img" if broken else "clean.img")
    with image.open("wb") as handle:
        handle.truncate(mib * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)], check=True)
    if broken:
        subprocess.run(["debugfs", "-w", "-R", "clri <2>", str(image)], check=True)
    return image


def put_on_volume(setup: Setup, image: Path) -> None:
    """Writes `image` onto the job's LV (through sftp and dd in the lab host)."""
    staged = f"/tmp/{image.name}"
    client = setup.host.connect()
    try:
        with client.open_sftp() as sftp:
            sftp.put(str(image), staged)
    finally:
        client.close()
    device = f"/dev/{VG}/{setup.volume}"
    ok(setup.host, ["dd", f"if={staged}", f"of={device}", "bs=1M", "conv=fsync", "status=none"])
    ok(setup.host, ["rm", staged])


def drill_json(config: Path, job: str, *args: str) -> tuple[int, dict[str, object]]:
    done = gfs_subprocess("drill", job, "--config", str(config), "--json", *args)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_a_drill_of_an_lv_generation_on_a_remote_target_checks_its_filesystem(
    make_setup: object, run_gfs: RunGfs, tmp_path: Path
) -> None:
    setup = make_setup(size_mib=48, data_mib=0)  # type: ignore[operator]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    text = setup.config.read_text()
    volume_line = f"volume = {json.dumps(f'{VG}/{setup.volume}')}\n"
    setup.config.write_text(
        text.replace(volume_line, f"{volume_line}scratch_dir = {json.dumps(str(scratch))}\n")
    )
    put_on_volume(setup, ext4_image(tmp_path, 48, broken=False))
    first = gfs_subprocess("run", "--config", str(setup.config))
    assert first.returncode == 0, first.stderr
    (good,) = listing(run_gfs("list", "--config", str(setup.config), "--json"))

    started = time.monotonic()
    status, result = drill_json(setup.config, setup.job)
    print(
        f"drill of a 48 MiB ext4 LV image on the remote target: {time.monotonic() - started:.1f} s"
    )
    assert status == 0, result
    assert result["outcome"] == "pass" and result["generation"] == good["id"]
    assert result["check"] == "restore + image checksum + read-only filesystem check"
    assert str(result["reason"]).endswith("checksum matches; ext4: e2fsck found no errors")
    assert list(scratch.iterdir()) == []  # the scratch copy is gone
    manifest = json.loads(ok(setup.host, ["cat", f"{good['path']}/manifest.json"]))
    assert manifest["drills"][-1]["outcome"] == "pass"

    # The volume's filesystem was already broken when it was backed up: the generation's
    # checksums are right, the drill must still fail.
    put_on_volume(setup, ext4_image(tmp_path, 48, broken=True))
    time.sleep(1.1)  # a new generation id (one per second)
    second = gfs_subprocess("run", "--force", "--config", str(setup.config))
    assert second.returncode == 0, second.stderr
    broken = listing(run_gfs("list", "--config", str(setup.config), "--json"))[-1]
    status, result = drill_json(setup.config, setup.job)
    assert status == 5, result
    assert result["outcome"] == "fail" and result["generation"] == broken["id"]
    assert "ext4: e2fsck exit status" in str(result["reason"])
    assert "Root inode is not a directory" in str(result["reason"])
    manifest = json.loads(ok(setup.host, ["cat", f"{broken['path']}/manifest.json"]))
    assert manifest["drills"][-1]["outcome"] == "fail"

    # A byte of the good generation flipped on the target: the drill fails on the checksum.
    ok(
        setup.host,
        ["sh", "-c", f"printf x | dd of={good['path']}/volume.raw bs=1 seek=1234567 conv=notrunc"],
    )
    status, result = drill_json(setup.config, setup.job, "--generation", good["id"])
    assert status == 5, result
    assert "does not match the manifest" in str(result["reason"])
    assert list(scratch.iterdir()) == []
    (job,) = json.loads(run_gfs("status", "--config", str(setup.config), "--json").stdout)["jobs"]
    assert job["last_drill"]["generation"] == good["id"]
    assert job["last_drill"]["outcome"] == "fail"
