"""Connection.wait_backup / has_backup_job across a libvirtd restart, on a scripted fake
libvirt (the real restart is in tests/system/test_libvirt_restart.py)."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest

from gfs_backup.tools import virt
from gfs_backup.tools.virt import Connection, ConnectionLost, VirtError

pytestmark = pytest.mark.unit

UUID = "6b1f4c2e-0000-4000-8000-000000000001"
DIE = {"die": True}  # in a script: libvirtd goes away at this poll
ACTIVE = {"type": 2, "operation": 9, "disk_total": 100, "disk_processed": 10}
NONE = {"type": 0}
COMPLETED = {"type": 3, "operation": 9, "success": True}


class FakeError(Exception):
    def get_error_code(self) -> int:
        return 1


class FakeDomain:
    """A domain on one FakeConn: jobStats answers from `script`, and with the completed flag
    from `completed` (in each, the last entry repeats)."""

    def __init__(
        self, conn: FakeConn, script: list[dict[str, Any]], completed: list[dict[str, Any]]
    ):
        self.conn = conn
        self.script = script
        self.completed = completed

    def connect(self) -> FakeConn:
        return self.conn

    def name(self) -> str:
        return "web01"

    def UUIDString(self) -> str:
        return UUID

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        if not self.conn.alive:
            raise FakeError("internal error: client socket is closed")
        script = self.completed if flags else self.script
        step = script.pop(0) if len(script) > 1 else script[0]
        if step is DIE:
            self.conn.alive = False
            raise FakeError("Cannot write data: Broken pipe")
        return step

    def state(self) -> list[int]:
        if not self.conn.alive:
            raise FakeError("internal error: client socket is closed")
        return [1, 1]


class FakeConn:
    def __init__(
        self,
        script: list[dict[str, Any]],
        completed: dict[str, Any] | list[dict[str, Any]] = NONE,
    ):
        self.alive = True
        self.closed = False
        results = completed if isinstance(completed, list) else [completed]
        self.dom = FakeDomain(self, script, results)

    def isAlive(self) -> int:
        return int(self.alive)

    def lookupByName(self, name: str) -> FakeDomain:
        return self.dom

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        assert uuid == UUID
        return self.dom

    def close(self) -> None:
        self.closed = True


def fake_libvirt(opens: Iterator[FakeConn | None]) -> types.SimpleNamespace:
    """A libvirt module whose open() hands out `opens` (None: libvirtd does not answer)."""

    def open_(uri: str) -> FakeConn:
        conn = next(opens)
        if conn is None:
            raise FakeError(f"Failed to connect socket to {uri}")
        return conn

    return types.SimpleNamespace(
        libvirtError=FakeError,
        open=open_,
        VIR_DOMAIN_JOB_NONE=0,
        VIR_DOMAIN_JOB_UNBOUNDED=1,
        VIR_DOMAIN_JOB_BOUNDED=2,
        VIR_DOMAIN_JOB_COMPLETED=3,
        VIR_DOMAIN_JOB_OPERATION_BACKUP=9,
        VIR_DOMAIN_JOB_STATS_COMPLETED=1,
        VIR_DOMAIN_RUNNING=1,
        VIR_DOMAIN_PAUSED=3,
    )


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, seconds in [
        ("POLL_SECONDS", 0.0),
        ("RECONNECT_SECONDS", 0.2),
        ("RECONNECT_POLL_SECONDS", 0.01),
        ("LOST_JOB_SECONDS", 0.05),
    ]:
        monkeypatch.setattr(virt, name, seconds)


def connect(monkeypatch: pytest.MonkeyPatch, *conns: FakeConn | None) -> Connection:
    """A Connection on conns[0]; later opens get the rest, then libvirtd stays away."""
    opens = iter([*conns, *([None] * 10_000)])
    monkeypatch.setattr(virt, "_libvirt", lambda: fake_libvirt(opens))
    return Connection("qemu:///system")


def test_a_job_recovered_after_a_restart_is_waited_for_on_the_new_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = FakeConn([ACTIVE, DIE])
    second = FakeConn([ACTIVE, NONE], COMPLETED)
    connection = connect(monkeypatch, first, None, None, second)
    domain = connection.domain("web01")
    assert connection.wait_backup(domain, None, 60) == COMPLETED
    assert connection.conn is second and first.closed
    assert connection.is_running(domain)  # the old handle is mapped to the new connection
    assert not connection.has_backup_job(domain)


def test_no_job_right_after_a_restart_is_not_believed_until_libvirt_recovered_the_domain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A restarted libvirtd answers "no job" until its reconnect thread has recovered the
    # domain's backup job; the job then shows again and ends normally.
    second = FakeConn([NONE, NONE, NONE, ACTIVE, ACTIVE, NONE], [NONE, NONE, NONE, COMPLETED])
    connection = connect(monkeypatch, FakeConn([ACTIVE, DIE]), second)
    assert connection.wait_backup(connection.domain("web01"), None, 60) == COMPLETED


def test_a_job_that_failed_while_libvirtd_was_away_reports_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failed = {"type": 4, "operation": 9, "errmsg": "No space left on device"}
    connection = connect(monkeypatch, FakeConn([ACTIVE, DIE]), FakeConn([NONE], failed))
    with pytest.raises(VirtError, match="backup failed: No space left on device"):
        connection.wait_backup(connection.domain("web01"), None, 60)


def test_a_job_gone_after_a_restart_fails_with_one_clear_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connection = connect(monkeypatch, FakeConn([ACTIVE, DIE]), FakeConn([NONE]))
    with pytest.raises(VirtError) as error:
        connection.wait_backup(connection.domain("web01"), None, 60)
    assert str(error.value) == (
        "domain web01: libvirtd restarted during the backup and the backup job was lost; "
        "no generation was made; the next run backs it up"
    )


def test_a_job_libvirt_keeps_without_its_qemu_job_counts_as_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    zombie = {"type": 2, "operation": 9, "time_elapsed": 1}  # libvirt 9: no disk statistics
    connection = connect(monkeypatch, FakeConn([ACTIVE, DIE]), FakeConn([zombie]))
    domain = connection.domain("web01")
    with pytest.raises(VirtError, match="the backup job was lost"):
        connection.wait_backup(domain, None, 60)
    assert connection.has_backup_job(domain)  # the caller aborts it


def test_libvirtd_that_does_not_come_back_is_a_lost_connection_naming_the_uri(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connection = connect(monkeypatch, FakeConn([ACTIVE, DIE]))
    domain = connection.domain("web01")
    with pytest.raises(ConnectionLost, match=r"libvirtd at qemu:///system went away and did not"):
        connection.wait_backup(domain, None, 60)
    with pytest.raises(ConnectionLost, match="cannot tell whether a backup job is left"):
        connection.has_backup_job(domain)  # so the journal entry stays open


def test_a_domain_that_stopped_is_still_reported_as_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = FakeConn([ACTIVE])
    connection = connect(monkeypatch, conn)
    domain = connection.domain("web01")

    def gone(flags: int = 0) -> dict[str, Any]:
        raise FakeError("Requested operation is not valid: domain is not running")

    monkeypatch.setattr(conn.dom, "jobStats", gone)
    monkeypatch.setattr(conn.dom, "state", lambda: [5, 1])
    with pytest.raises(VirtError, match="domain web01 stopped during its backup"):
        connection.wait_backup(domain, None, 60)
    assert not connection.has_backup_job(domain)


def test_a_pull_job_is_found_after_a_restart_once_libvirt_recovered_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pull mode: gfs read from QEMU's NBD server while libvirtd restarted; ending the job
    # then needs the new connection, and the job shows only after libvirt recovered it.
    pull = {"type": 1, "operation": 9}
    first = FakeConn([pull])
    first.alive = False
    second = FakeConn([NONE, NONE, pull])
    connection = connect(monkeypatch, first, second)
    domain = connection.domain("web01")
    monkeypatch.setattr(virt, "LOST_JOB_SECONDS", 5.0)
    assert connection.backup_job_after_restart(domain, "job web")
    assert connection.conn is second


def test_no_pull_job_after_a_restart_is_believed_once_it_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = FakeConn([NONE])
    first.alive = False
    connection = connect(monkeypatch, first, FakeConn([NONE]))
    assert not connection.backup_job_after_restart(connection.domain("web01"), "job web")


def test_a_libvirtd_that_stays_away_when_the_pull_job_ends_is_a_lost_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = FakeConn([NONE])
    first.alive = False
    connection = connect(monkeypatch, first)
    with pytest.raises(ConnectionLost, match="did not come back"):
        connection.backup_job_after_restart(connection.domain("web01"), "job web")


def test_a_connection_found_dead_only_by_the_call_is_opened_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # libvirt's isAlive() stays true until a call fails on the broken socket (seen in CI).
    pull = {"type": 1, "operation": 9}
    first = FakeConn([DIE])
    second = FakeConn([pull])
    connection = connect(monkeypatch, first, second)
    assert connection.backup_job_after_restart(connection.domain("web01"), "job web")
    assert connection.conn is second


def test_a_failed_local_connection_says_whether_libvirt_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gfs_backup.tools import virt

    monkeypatch.setattr(virt.shutil, "which", lambda name, path=None: None)
    assert "libvirt is not installed on this host: apt install libvirt-daemon-system" in (
        virt._hint("qemu:///system")
    )
    monkeypatch.setattr(virt.shutil, "which", lambda name, path=None: "/usr/sbin/libvirtd")
    assert "is libvirtd running?" in virt._hint("qemu:///system")
    assert virt._hint("qemu+ssh://kvm2/system") == ""
