"""vm_capture.decide: when a libvirt run may read only what changed, and why not."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest

from gfs_backup.backends.base import JobContext
from gfs_backup.backends.vm_capture import (
    checkpoint_name,
    decide,
    full_verify_time,
    is_job_checkpoint,
)
from gfs_backup.core.config import Job
from gfs_backup.target.catalog import Stored
from gfs_backup.target.manifest import DataFile, Manifest
from gfs_backup.tools.domainxml import Disk

NOW = datetime(2026, 12, 6, 2, 0, tzinfo=timezone.utc)
UUID = "6f1c0ae2-3c8e-4c64-9d1f-2b8f3f0d5a11"
DISKS = [Disk("vda", "/var/lib/libvirt/images/web.qcow2", "qcow2", "file")]


def context(**options: Any) -> JobContext:
    job = Job("web", "libvirt", "local", "nas", cast(Any, None), {"domain": "web", **options})
    return JobContext(job, cast(Any, None), cast(Any, None), 1, NOW, logging.getLogger("t"))


def stored(
    generation: str = "20261205T020000Z",
    verified_days_ago: float = 1,
    last_full_days_ago: float = 3,
    uuid: str = UUID,
    checkpoint: bool = True,
    scope: str | None = None,
) -> Stored:
    verified = NOW - timedelta(days=verified_days_ago)
    record: dict[str, Any] = {"time": verified.isoformat(), "result": "ok", "problems": []}
    if scope:
        record["scope"] = scope
    capture = {
        "mode": "full",
        "checkpoint": checkpoint_name("web", generation) if checkpoint else None,
        "last_full_at": (NOW - timedelta(days=last_full_days_ago)).isoformat(),
    }
    manifest = Manifest(
        job="web",
        kind="libvirt",
        host="local",
        generation=generation,
        created_at=NOW - timedelta(days=1),
        files=(DataFile("disks/vda.raw", 1 << 30, "x"), DataFile("blocks/vda.sha256-1m", 1, "y")),
        source={"uuid": uuid, "capture": capture},
        verify=(record,),
    )
    return Stored(Path("/t/web") / generation, manifest)


def own(base: Stored) -> list[str]:
    return [checkpoint_name("web", base.id)]


WITHIN = {"base_verified_within": 7 * 86400, "full_every": 30 * 86400}


def test_a_sound_base_is_built_on() -> None:
    base = stored()
    decision = decide(context(**WITHIN), DISKS, base, UUID, own(base))
    assert (decision.base, decision.reason, decision.compare) == (base, "", False)
    assert decision.incremental == "gfs-web--20261205T020000Z"


@pytest.mark.parametrize(
    ("options", "base", "disks", "uuid", "checkpoints", "reason"),
    [
        ({"incremental": False}, stored(), DISKS, UUID, None, "incremental = false"),
        ({}, None, DISKS, UUID, None, "first run"),
        ({}, stored(checkpoint=False), DISKS, UUID, None, "has no checkpoint"),
        ({}, stored(), DISKS, "another-uuid", None, "was redefined"),
        ({}, stored(), [Disk("vda", "/dev/vg/web", "raw", "block")], UUID, None, "raw"),
        ({}, stored(), [*DISKS, Disk("vdb", "/x.qcow2", "qcow2", "file")], UUID, None,
         "disk vdb is not in generation"),
        ({}, stored(), DISKS, UUID, [], "is missing"),
        (WITHIN, stored(verified_days_ago=8), DISKS, UUID, None, "base_verified_within (7d)"),
    ],
)  # fmt: skip
def test_what_makes_a_run_read_everything(
    options: dict[str, Any],
    base: Stored | None,
    disks: list[Disk],
    uuid: str,
    checkpoints: list[str] | None,
    reason: str,
) -> None:
    found = checkpoints if checkpoints is not None else (own(base) if base else [])
    decision = decide(context(**options), disks, base, uuid, found)
    assert decision.base is None
    assert reason in decision.reason


def test_full_every_reads_everything_but_keeps_the_base_to_compare() -> None:
    base = stored(last_full_days_ago=31)
    decision = decide(context(**WITHIN), DISKS, base, UUID, own(base))
    assert decision.base is base and decision.compare
    assert "full_every (30d)" in decision.reason


def test_an_incremental_verify_is_not_a_full_one_but_a_gfs_verify_is() -> None:
    partial = stored(verified_days_ago=0, scope="changed+sample")
    assert full_verify_time(partial) is None  # nothing inherited, no full verify
    full = stored(verified_days_ago=2)
    assert full_verify_time(full) == NOW - timedelta(days=2)


def test_checkpoint_names_are_told_apart_between_jobs() -> None:
    assert is_job_checkpoint("gfs-web--20261205T020000Z", "web")
    assert is_job_checkpoint("gfs-web--20261205T020000Z-2", "web")
    assert not is_job_checkpoint("gfs-web--2--20261205T020000Z", "web")
    assert not is_job_checkpoint("gfs-web--20261205T020000Z", "web--2")
    assert not is_job_checkpoint("nightly", "web")
