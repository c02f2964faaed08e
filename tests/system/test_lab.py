"""The libvirt lab works: real libvirtd, TCG guests, the guest's disk pattern protocol.

These tests prove the fixtures later backup/restore tests build on: a guest writes a known
pattern to its disk, a second domain booted on a copy of that disk finds it intact, a blank
disk is reported as bad, a running guest's busy disk can be copied by libvirt itself, and
qemu-ga in the guest answers (so quiesced backups can be tested).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import libvirt
import pytest

from tests.lab.domains import DomainFactory, copy_disk
from tests.lab.fixtures import guest_image, libvirt_conn, libvirt_daemon, make_domain
from tests.lab.guest import (
    BOOT_MARKER,
    CHURN_MARKER,
    PATTERN_BAD,
    PATTERN_OK,
    PATTERN_WRITTEN,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]
__all__ = ["guest_image", "libvirt_conn", "libvirt_daemon", "make_domain"]  # used as fixtures


def test_guest_boots_to_its_marker(make_domain: DomainFactory) -> None:
    domain = make_domain(action="idle")
    line = domain.wait_for(BOOT_MARKER, timeout=90)
    boot_seconds = time.monotonic() - domain.started_at
    print(f"{domain.name}: boot to marker {boot_seconds:.1f} s")
    assert "action=idle" in line
    assert domain.is_active()


def test_pattern_written_by_a_guest_is_intact_on_a_copy_of_its_disk(
    make_domain: DomainFactory,
) -> None:
    writer = make_domain(action="write-pattern", tag="gen1")
    assert writer.wait_for(PATTERN_WRITTEN) == f"{PATTERN_WRITTEN} tag=gen1"
    writer.wait_shutoff()
    copy = copy_disk(writer.disk, make_domain.path("copy.qcow2"))

    checker = make_domain(action="check-pattern", tag="gen1", disk=copy)

    assert checker.wait_for("GFS-PATTERN-") == f"{PATTERN_OK} tag=gen1"
    checker.wait_shutoff()


def test_pattern_in_a_guest_filesystem_is_intact_on_a_copy_of_its_disk(
    make_domain: DomainFactory,
) -> None:
    writer = make_domain(action="write-pattern", tag="fs1", layout="fs")
    writer.wait_for(PATTERN_WRITTEN)
    writer.wait_shutoff()

    checker = make_domain(action="check-pattern", tag="fs1", layout="fs", disk=writer.disk)

    assert checker.wait_for("GFS-PATTERN-") == f"{PATTERN_OK} tag=fs1"


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (False, f"{PATTERN_BAD} data tag=none"),
        (True, f"{PATTERN_BAD} tag=gen1 expected=gen2"),
    ],
    ids=["blank-disk", "other-generation"],
)
def test_pattern_check_reports_a_disk_without_the_expected_data(
    make_domain: DomainFactory, write: bool, expected: str
) -> None:
    disk = None
    if write:
        writer = make_domain(action="write-pattern", tag="gen1")
        writer.wait_for(PATTERN_WRITTEN)
        writer.wait_shutoff()
        disk = writer.disk

    checker = make_domain(action="check-pattern", tag="gen2", disk=disk)

    assert checker.wait_for("GFS-PATTERN-") == expected


def _backup_xml(target: Path) -> str:
    return (
        "<domainbackup mode='push'><disks><disk name='vda' type='file'>"
        f"<target file='{target}'/><driver type='qcow2'/></disk></disks></domainbackup>"
    )


def _wait_for_backup(domain: libvirt.virDomain, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while domain.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        assert time.monotonic() < deadline, "backup job did not finish"
        time.sleep(0.2)
    stats = domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    assert stats.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED, stats


def test_running_guest_with_a_busy_disk_can_be_backed_up_by_libvirt(
    make_domain: DomainFactory,
) -> None:
    busy = make_domain(action="churn", tag="live")
    busy.wait_for(PATTERN_WRITTEN)
    busy.wait_for(f"{CHURN_MARKER} 100")
    target = make_domain.path("backup.qcow2")

    busy.domain.backupBegin(_backup_xml(target), None)
    _wait_for_backup(busy.domain)
    assert busy.is_active()

    checker = make_domain(action="check-pattern", tag="live", disk=target)
    assert checker.wait_for("GFS-PATTERN-") == f"{PATTERN_OK} tag=live"


def test_guest_agent_answers_and_freezes_the_guest_filesystem(make_domain: DomainFactory) -> None:
    guest = make_domain(action="write-pattern", after="idle", layout="fs", agent=True)
    guest.wait_for_agent()
    guest.wait_for(PATTERN_WRITTEN)

    info = json.loads(guest.agent_command('{"execute": "guest-info"}'))
    frozen = guest.domain.fsFreeze()
    status = json.loads(guest.agent_command('{"execute": "guest-fsfreeze-status"}'))
    thawed = guest.domain.fsThaw()

    commands = {command["name"] for command in info["return"]["supported_commands"]}
    assert {"guest-fsfreeze-freeze", "guest-fsfreeze-thaw"} <= commands
    assert (frozen, status, thawed) == (1, {"return": "frozen"}, 1)  # one filesystem: /mnt
