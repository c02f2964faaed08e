"""libvirtd restarted (or gone) while gfs waits for a libvirt job of a running domain.

Every test restarts the lab's libvirtd, so the session must have started it and be its only
user: `require_restartable` fails the test with the reason otherwise (never skips).
To be in the middle of a backup job for sure, the test waits until the job is active and
then slows QEMU's job down to SLOW_BYTES_PER_SECOND (QMP block-job-set-speed through libvirt:
libvirt has no speed setting for backups); it lets the job run at full speed again after the
restart when the test wants it to finish. The block commit of the snapshot method never ends
by itself (an active commit waits for the pivot), so that test restarts libvirtd from gfs's
"mid-commit" crash point, in process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from gfs_backup.tools.virt import RECONNECT_SECONDS
from tests.conftest import RunGfs
from tests.lab.daemons import LibvirtDaemons
from tests.lab.domains import DomainFactory, LabDomain, reap_stale_domains
from tests.lab.errors import LabError
from tests.lab.fixtures import guest_image, libvirt_daemon, make_domain
from tests.system.conftest import Mounter
from tests.system.helpers import assert_same_image, gfs_subprocess, write_config
from tests.system.test_libvirt_snapshot import SNAPSHOT, disk_sources

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_daemon", "make_domain"]

DAILY = """
[job.policy]
semantics = "restic"
timezone = "UTC"
schedule = "daily"
[job.policy.retention]
keep-last = 3
"""
# QEMU's own backup job writes the image (push mode): what a libvirtd restart can lose. In
# pull mode gfs reads from QEMU's NBD server, which a libvirtd restart leaves alone.
PUSH = 'method = "push"\n'
# Random data. Until libvirt's backupBegin lets go of the monitor, QEMU's job runs at full
# speed to tmpfs: 384 MiB once ended before the test could slow it down (seen here).
DATA_MIB = 1536
SLOW_BYTES_PER_SECOND = 1 << 20
QEMU_STATUS_DIR = Path("/run/libvirt/qemu")  # libvirtd's live status XML of each domain
StartGfs = Callable[..., subprocess.Popen[str]]


def require_restartable(daemons: LibvirtDaemons) -> None:
    """Fails the test, saying why, unless this session may restart libvirtd."""
    try:
        daemons.check_restartable()
    except LabError as why:
        message = str(why)
    else:
        return
    pytest.fail(message, pytrace=False)


@pytest.fixture
def libvirt_conn(libvirt_daemon: LibvirtDaemons) -> Iterator[libvirt.virConnect]:
    """A connection per test (not per session): these tests restart libvirtd, which breaks
    every connection open before. make_domain uses it; its `reconnect` replaces it."""
    conn = libvirt.open(libvirt_daemon.uri)
    try:
        reap_stale_domains(conn)
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


@pytest.fixture
def start_gfs() -> Iterator[StartGfs]:
    """start_gfs(*args) -> a running `gfs` process; killed by its PID at the end if alive."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "gfs_backup", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def data_disk(tmp_path: Path, mib: int) -> tuple[Path, Path]:
    """A raw file of `mib` MiB random data and a qcow2 copy of it (the domain's disk)."""
    raw = tmp_path / "data.raw"
    with raw.open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))
    disk = tmp_path / "data.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True
    )
    return raw, disk


def poll_while_gfs_runs(
    ready: Callable[[], bool],
    what: str,
    gfs: subprocess.Popen[str],
    timeout: float = 120.0,
    interval: float = 0.05,
) -> None:
    """Calls `ready` every `interval` s until it is true; fails the test, saying `what` was
    awaited, when gfs exits first or `timeout` s pass. A libvirtError counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except libvirt.libvirtError:  # e.g. "backup job data missing" while the job starts
            pass
        if gfs.poll() is not None:
            pytest.fail(f"gfs ended before {what}: {gfs.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(interval)


def wait_for_backup_job(conn: libvirt.virConnect, name: str, gfs: subprocess.Popen[str]) -> None:
    """Waits until libvirt reports an active backup job of `name`."""

    def active() -> bool:
        stats = conn.lookupByName(name).jobStats()
        return stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP and stats.get(
            "type"
        ) in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)

    poll_while_gfs_runs(active, f"libvirt's backup job of {name}", gfs)


def qemu_backup_jobs(conn: libvirt.virConnect, name: str) -> list[dict[str, Any]]:
    """QEMU's block jobs of type backup on domain `name` (QMP query-block-jobs)."""
    reply = libvirt_qemu.qemuMonitorCommand(
        conn.lookupByName(name), '{"execute": "query-block-jobs"}', 0
    )
    return [job for job in json.loads(reply)["return"] if job["type"] == "backup"]


def set_backup_speed(conn: libvirt.virConnect, name: str, speed: int) -> list[dict[str, Any]]:
    """Sets the speed limit (bytes/s, 0 = none) of QEMU's backup jobs of `name`; returns
    the jobs as they were. Fails the test when there is none (the backup already ended)."""
    jobs = qemu_backup_jobs(conn, name)
    assert jobs, f"{name}: the backup job ended before the test could slow it down"
    for job in jobs:
        command = {
            "execute": "block-job-set-speed",
            "arguments": {"device": job["device"], "speed": speed},
        }
        libvirt_qemu.qemuMonitorCommand(conn.lookupByName(name), json.dumps(command), 0)
    return jobs


def cancel_qemu_backup_jobs(name: str) -> None:
    """While libvirtd is down: cancel and dismiss QEMU's backup jobs of domain `name` through
    its QMP monitor socket (free while libvirtd is away), so the restarted libvirtd finds
    its backup job gone from QEMU."""
    status = (QEMU_STATUS_DIR / f"{name}.xml").read_text()
    match = re.search(r"<monitor path='([^']+)'", status)
    assert match, f"no QMP monitor in {QEMU_STATUS_DIR / name}.xml"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(match.group(1))
        with sock.makefile("rw") as qmp:

            def command(execute: str, **arguments: object) -> Any:
                qmp.write(json.dumps({"execute": execute, "arguments": arguments}) + "\n")
                qmp.flush()
                while True:
                    reply = json.loads(qmp.readline())
                    if "event" not in reply:
                        assert "error" not in reply, reply
                        return reply["return"]

            json.loads(qmp.readline())  # the greeting
            command("qmp_capabilities")
            every = command("query-jobs")
            jobs = [job for job in every if job["type"] == "backup"]
            assert jobs, f"{name}: QEMU runs no backup job (its jobs: {every})"
            for job in jobs:
                command("block-job-cancel", device=job["id"], force=True)
            deadline = time.monotonic() + 30
            while any(job["status"] != "concluded" for job in command("query-jobs")):
                assert time.monotonic() < deadline, "QEMU's backup job did not conclude"
                time.sleep(0.1)
            for job in jobs:
                command("job-dismiss", id=job["id"])


def has_job(conn: libvirt.virConnect, name: str) -> bool:
    return bool(conn.lookupByName(name).jobStats().get("type"))


def wait_for_job(conn: libvirt.virConnect, name: str, timeout: float = 30.0) -> bool:
    """True once `name` has a job again after a restart; False if none in `timeout` s."""
    deadline = time.monotonic() + timeout
    while not has_job(conn, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def failure_lines(stderr: str) -> list[str]:
    """The lines gfs reports the job's failure with."""
    return [line for line in stderr.splitlines() if "job vm: failed:" in line]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_next_run_heals(
    config: Path, target: Path, conn: libvirt.virConnect, vm: LabDomain
) -> str:
    """A following `gfs run --force` succeeds, leaves no job and no partial export, and
    `gfs verify` passes; returns the run's stderr."""
    healed = gfs_subprocess("run", "--force", "--config", str(config))
    assert healed.returncode == 0, healed.stderr
    assert [n for n in leftovers(target / "vm") if n.startswith(".")] == []
    assert not has_job(conn, vm.name)
    assert vm.is_active()
    verified = gfs_subprocess("verify", "--config", str(config))
    assert verified.returncode == 0, verified.stderr
    return healed.stderr


def start_slowed_backup(
    make_domain: DomainFactory, mounts: Mounter, tmp_path: Path, start_gfs: StartGfs
) -> tuple[LabDomain, Path, Path, Path, subprocess.Popen[str]]:
    """An idle domain on a disk of random data, `gfs run` started on it, its backup job
    seen and slowed down. Returns the domain, the raw data, config, target and process."""
    target = mounts("tgt", kind="tmpfs", size_mb=4 * DATA_MIB)  # before QEMU starts, as NFS
    raw, disk = data_disk(tmp_path, DATA_MIB)
    vm = make_domain(action="idle", disk=disk)
    vm.wait_for("GFS-GUEST-UP")
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY, PUSH)
    gfs = start_gfs("run", "--config", str(config))
    slow_down_as_it_starts(make_domain.conn, vm.name, gfs)
    (job,) = qemu_backup_jobs(make_domain.conn, vm.name)
    assert job["offset"] < job["len"], f"the backup ended before it was slowed down: {job}"
    wait_for_backup_job(make_domain.conn, vm.name, gfs)
    return vm, raw, config, target, gfs


def slow_down_as_it_starts(conn: libvirt.virConnect, name: str, gfs: subprocess.Popen[str]) -> None:
    """Slows QEMU's backup job of `name` down the moment QEMU has one. Waiting for libvirt
    to report its job first left a window in which QEMU copied the whole disk to the tmpfs
    target (seen in CI); QMP answers as soon as libvirt's backupBegin has started it."""
    poll_while_gfs_runs(
        lambda: bool(qemu_backup_jobs(conn, name)), f"QEMU's backup job of {name}", gfs,
        interval=0.01,
    )  # fmt: skip
    set_backup_speed(conn, name, SLOW_BYTES_PER_SECOND)


def test_libvirtd_restarted_mid_backup_the_recovered_job_makes_a_sound_generation(
    libvirt_daemon: LibvirtDaemons,
    make_domain: DomainFactory,
    mounts: Mounter,
    tmp_path: Path,
    start_gfs: StartGfs,
) -> None:
    require_restartable(libvirt_daemon)
    vm, raw, config, target, gfs = start_slowed_backup(make_domain, mounts, tmp_path, start_gfs)
    libvirt_daemon.restart_libvirtd()
    conn = make_domain.reconnect(libvirt_daemon.uri)
    # Measured on libvirt 9.0: the restarted libvirtd reconnects to QEMU and keeps the job,
    # once its reconnect thread has recovered the domain (until then: no job, seen in CI).
    assert wait_for_job(conn, vm.name), "libvirt lost the backup job in the restart"
    set_backup_speed(conn, vm.name, 0)
    _, stderr = gfs.communicate(timeout=600)
    assert gfs.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert f"lost the connection to libvirt at {libvirt_daemon.uri}; reconnecting" in stderr
    assert f"reconnected to libvirt at {libvirt_daemon.uri}" in stderr
    (generation,) = leftovers(target / "vm")  # no .partial-* beside it
    exported = target / "vm" / generation / "disks" / "vda.qcow2"
    assert_same_image(exported, raw, "qcow2")  # every byte is there
    assert vm.is_active()
    assert not has_job(conn, vm.name)
    assert_next_run_heals(config, target, conn, vm)


def test_backup_job_lost_in_a_libvirtd_restart_fails_clearly(
    libvirt_daemon: LibvirtDaemons,
    make_domain: DomainFactory,
    mounts: Mounter,
    tmp_path: Path,
    start_gfs: StartGfs,
) -> None:
    require_restartable(libvirt_daemon)
    vm, _, config, target, gfs = start_slowed_backup(make_domain, mounts, tmp_path, start_gfs)
    with libvirt_daemon.libvirtd_stopped():
        cancel_qemu_backup_jobs(vm.name)
    conn = make_domain.reconnect(libvirt_daemon.uri)
    _, stderr = gfs.communicate(timeout=600)
    assert gfs.returncode == 5, stderr
    assert "Traceback" not in stderr
    (line,) = failure_lines(stderr)
    assert (
        f"domain {vm.name}: libvirtd restarted during the backup and the backup job was "
        "lost; no generation was made; the next run backs it up"
    ) in line
    assert leftovers(target / "vm") == []  # the partial export is gone, nothing published
    assert vm.is_active()
    assert not has_job(conn, vm.name)  # libvirt's job without a QEMU job was aborted
    assert_next_run_heals(config, target, conn, vm)


def test_libvirtd_that_does_not_come_back_fails_clearly_and_the_next_run_aborts_the_job(
    libvirt_daemon: LibvirtDaemons,
    make_domain: DomainFactory,
    mounts: Mounter,
    tmp_path: Path,
    start_gfs: StartGfs,
) -> None:
    require_restartable(libvirt_daemon)
    vm, _, config, target, gfs = start_slowed_backup(make_domain, mounts, tmp_path, start_gfs)
    with libvirt_daemon.libvirtd_stopped():
        _, stderr = gfs.communicate(timeout=RECONNECT_SECONDS + 120)
    conn = make_domain.reconnect(libvirt_daemon.uri)
    assert gfs.returncode == 5, stderr
    assert "Traceback" not in stderr
    (line,) = failure_lines(stderr)
    assert (
        f"libvirtd at {libvirt_daemon.uri} went away and did not come back within "
        f"{RECONNECT_SECONDS:.0f} s; no generation was made"
    ) in line
    assert leftovers(target / "vm") == []
    assert vm.is_active()
    assert wait_for_job(conn, vm.name)  # QEMU went on; libvirt recovered the job gfs left
    healed = assert_next_run_heals(config, target, conn, vm)
    assert f"aborted stale backup job of {vm.name}" in healed


def test_libvirtd_restarted_during_the_block_commit_of_the_snapshot_method(
    libvirt_daemon: LibvirtDaemons,
    make_domain: DomainFactory,
    mounts: Mounter,
    tmp_path: Path,
    run_gfs: RunGfs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_restartable(libvirt_daemon)
    target = mounts("tgt", kind="tmpfs", size_mb=512)
    vm = make_domain(action="churn", tag="rc1")
    vm.wait_for("GFS-CHURN 100")
    config = write_config(
        tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY, extra=SNAPSHOT
    )

    def restart_mid_commit(point: str) -> None:
        if point == "mid-commit":  # an active commit job runs until gfs pivots
            assert make_domain.conn.lookupByName(vm.name).blockJobInfo("vda", 0)
            libvirt_daemon.restart_libvirtd()

    monkeypatch.setattr("gfs_backup.backends.libvirt.crash_point", restart_mid_commit)
    result = run_gfs("run", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert f"reconnected to libvirt at {libvirt_daemon.uri}" in result.stderr
    assert "vda is on its own disk again" in result.stderr
    conn = make_domain.reconnect(libvirt_daemon.uri)
    assert disk_sources(conn, vm.name) == [str(vm.disk)]
    assert disk_sources(conn, vm.name, inactive=True) == [str(vm.disk)]
    assert not conn.lookupByName(vm.name).blockJobInfo("vda", 0)
    assert [p.name for p in vm.disk.parent.iterdir() if ".gfs-overlay-" in p.name] == []
    assert vm.is_active()
    assert leftovers(target / "vm")[0].startswith("2")  # one generation, no .partial-*
    assert gfs_subprocess("verify", "--config", str(config)).returncode == 0


def test_libvirtd_restarted_during_a_pull_mode_backup_leaves_a_sound_generation_and_no_job(
    libvirt_daemon: LibvirtDaemons,
    make_domain: DomainFactory,
    mounts: Mounter,
    tmp_path: Path,
    start_gfs: StartGfs,
) -> None:
    # Pull mode (the default): gfs reads from QEMU's NBD server, which a libvirtd restart
    # leaves alone; ending the job afterwards needs the restarted libvirtd.
    require_restartable(libvirt_daemon)
    target = mounts("tgt", kind="tmpfs", size_mb=256)
    raw, disk = data_disk(tmp_path, 48)
    vm = make_domain(action="idle", disk=disk)
    vm.wait_for("GFS-GUEST-UP")
    config = write_config(tmp_path, target, "vm", "libvirt", "domain", Path(vm.name), DAILY)
    limited = config.read_text().replace(
        "require_nfs = false\n", 'require_nfs = false\nbandwidth = "4M"\n'
    )
    config.write_text(limited)  # 48 MiB at 4 MiB/s: the restart lands mid-read
    gfs = start_gfs("run", "--config", str(config))
    wait_for_backup_job(make_domain.conn, vm.name, gfs)
    time.sleep(2)
    libvirt_daemon.restart_libvirtd()
    conn = make_domain.reconnect(libvirt_daemon.uri)
    _, stderr = gfs.communicate(timeout=300)
    assert gfs.returncode == 0, stderr
    assert "Traceback" not in stderr
    (generation,) = leftovers(target / "vm")
    assert_same_image(target / "vm" / generation / "disks" / "vda.raw", raw)
    assert vm.is_active()
    assert not has_job(conn, vm.name), stderr  # the recovered pull job was ended
    assert_next_run_heals(config, target, conn, vm)
