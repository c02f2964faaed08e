"""A remote host's SSH connection lost in the middle of a VM backup (the host is this machine
through a real sshd on 127.0.0.1, as in test_libvirt_remote.py). QEMU's backup job is slowed
down as it starts (QMP block-job-set-speed, as in test_libvirt_restart.py) so that the
connection is cut while libvirt's job runs for sure; it is cut by killing sshd's session
processes (the TCP connection is reset, as by a rebooted router or a restarted sshd).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from gfs_backup.tools.virt import RECONNECT_SECONDS
from tests.lab.domains import LabDomain
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.system.conftest import Mounter
from tests.system.helpers import assert_same_image, gfs_subprocess
from tests.system.sshd import Sshd, children, kill, restart, sshd
from tests.system.test_libvirt_remote import remote_config
from tests.system.test_libvirt_restart import (
    StartGfs,
    data_disk,
    has_job,
    leftovers,
    set_backup_speed,
    slow_down_as_it_starts,
    start_gfs,
    wait_for_backup_job,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain", "sshd", "start_gfs"]

DATA_MIB = 1024
LIBVIRT = "qemu:///system on host kvm2"


def slowed_remote_backup(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    sshd: Sshd,
    conn: libvirt.virConnect,
    start_gfs: StartGfs,
) -> tuple[LabDomain, Path, Path, Path, subprocess.Popen[str]]:
    target = mounts("tgt", kind="tmpfs", size_mb=3 * DATA_MIB)
    raw, disk = data_disk(tmp_path, DATA_MIB)
    vm: LabDomain = make_domain(action="idle", disk=disk)  # type: ignore[operator]
    vm.wait_for("GFS-GUEST-UP")
    sshd.trust()
    config = remote_config(tmp_path, sshd, target, vm.name)
    gfs = start_gfs("run", "--config", str(config))
    slow_down_as_it_starts(conn, vm.name, gfs)
    wait_for_backup_job(conn, vm.name, gfs)
    return vm, raw, config, target, gfs


def test_a_connection_dropped_mid_backup_is_reopened_and_the_generation_is_whole(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    sshd: Sshd,
    libvirt_conn: libvirt.virConnect,
    start_gfs: StartGfs,
) -> None:
    vm, raw, _config, target, gfs = slowed_remote_backup(
        make_domain, mounts, tmp_path, sshd, libvirt_conn, start_gfs
    )
    sessions = children(sshd.process.pid)
    assert sessions, "gfs has no SSH session open during its backup"
    kill(sessions)  # the connection is reset; the listener stays
    time.sleep(3)  # gfs notices while QEMU's job still runs slowly
    set_backup_speed(libvirt_conn, vm.name, 0)
    _, stderr = gfs.communicate(timeout=600)
    assert gfs.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert f"lost the connection to libvirt at {LIBVIRT}; reconnecting" in stderr
    assert f"reconnected to libvirt at {LIBVIRT}" in stderr
    (generation,) = leftovers(target / "vm")  # no partial beside it
    assert_same_image(target / "vm" / generation / "disks" / "vda.qcow2", raw, "qcow2")
    assert not has_job(libvirt_conn, vm.name) and vm.is_active()


def test_a_host_gone_mid_backup_fails_its_job_and_the_next_run_cleans_up(
    make_domain: object,
    mounts: Mounter,
    tmp_path: Path,
    sshd: Sshd,
    libvirt_conn: libvirt.virConnect,
    start_gfs: StartGfs,
) -> None:
    vm, raw, config, target, gfs = slowed_remote_backup(
        make_domain, mounts, tmp_path, sshd, libvirt_conn, start_gfs
    )
    sessions = children(sshd.process.pid)
    sshd.process.kill()  # no sshd at all: the host is unreachable
    sshd.process.wait()
    kill(sessions)
    _, stderr = gfs.communicate(timeout=RECONNECT_SECONDS + 180)
    assert gfs.returncode == 5, stderr
    assert "Traceback" not in stderr
    assert (
        f"libvirtd at {LIBVIRT} went away and did not come back within "
        f"{RECONNECT_SECONDS:.0f} s; no generation was made"
    ) in stderr
    assert stderr.count("cannot reach libvirt") == 1, stderr  # said once, not every second
    assert [name for name in leftovers(target / "vm") if not name.startswith(".")] == []
    assert has_job(libvirt_conn, vm.name)  # QEMU goes on with the job gfs left there

    restart(sshd)
    healed = gfs_subprocess("run", "--force", "--config", str(config))
    assert healed.returncode == 0, healed.stderr
    assert f"aborted stale backup job of {vm.name}" in healed.stderr
    assert [name for name in leftovers(target / "vm") if name.startswith(".")] == []
    (generation,) = leftovers(target / "vm")
    assert_same_image(target / "vm" / generation / "disks" / "vda.qcow2", raw, "qcow2")
    assert not has_job(libvirt_conn, vm.name) and vm.is_active()
