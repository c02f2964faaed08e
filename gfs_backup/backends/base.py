"""What every backend implements, and what the pipeline hands to it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from gfs_backup.copying.digest import ALGORITHM
from gfs_backup.core.config import Job
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.core.state import JournalEntry, State
from gfs_backup.target.catalog import Stored
from gfs_backup.target.fs import LOCAL_FS, TargetFS
from gfs_backup.target.manifest import DataFile
from gfs_backup.transport.runner import Runner

Progress = Callable[[int], None]
SNAPSHOT_PREFIX = "gfs-"


class SourceError(GfsError):
    """The source cannot be backed up (missing, not a subvolume, ...)."""

    exit_code = ExitCode.FAILED


@dataclass
class JobContext:
    """One job's run: who runs commands, where the journal goes, when it is."""

    job: Job
    runner: Runner
    state: State
    run_id: int
    now: datetime
    log: logging.Logger
    bandwidth: int = 0  # bytes/s this job may write to its target (its share); 0 = no limit
    target: TargetFS = LOCAL_FS  # the filesystem of the job's target (here or remote)


@dataclass(frozen=True)
class Snapshot:
    """A read-only snapshot gfs made; `path` is what the export reads."""

    path: Path
    subvolume: Path  # the snapshot subvolume itself (to delete)
    journal_id: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exported:
    """What an export wrote into the partial generation directory."""

    files: tuple[DataFile, ...] = ()
    tree: tuple[dict[str, Any], ...] = ()
    source: dict[str, Any] = field(default_factory=dict)
    point_in_time: bool = True
    bytes_written: int = 0
    warnings: tuple[str, ...] = ()
    digest_algorithm: str = ALGORITHM  # of the files' digests (copying/digest.py, target/fs.py)
    read_back: bool = False  # every file was read back from the target while written
    # What the export's read-back covered: "full", or "changed+sample" (an incremental
    # VM capture: the changed blocks and a sample of the others); recorded in the verify.
    verify_scope: str = "full"


@dataclass(frozen=True)
class RestoreOptions:
    """Restore choices that only some kinds use (libvirt: the new domain). `final`: where
    the restored `to` is renamed once complete and checked (paths written into a domain
    definition name it); None: `to` itself."""

    domain_name: str | None = None
    keep_interfaces: bool = False
    final: Path | None = None


def snapshot_name(job: str, when: datetime, run_id: int) -> str:
    """gfs-owned snapshot names: gfs-<job>-<UTC time>-r<run id>."""
    return f"{SNAPSHOT_PREFIX}{job}-{when.strftime('%Y%m%dT%H%M%SZ')}-r{run_id}"


def is_own_snapshot(path: Path, job: str) -> bool:
    return path.name.startswith(f"{SNAPSHOT_PREFIX}{job}-")


class Backend(Protocol):
    """A kind of job. One registry (backends/__init__.py), one contract test suite."""

    kind: str

    def sources(self, job: Job) -> list[Path]:
        """Paths whose filesystem a target must not share."""
        ...

    def check_source(self, ctx: JobContext) -> None:
        """Raise SourceError when the source cannot be backed up."""
        ...

    def snapshot(self, ctx: JobContext) -> Snapshot | None:
        """Make a journaled point-in-time snapshot, or None when the kind cannot."""
        ...

    def export(
        self,
        ctx: JobContext,
        snapshot: Snapshot | None,
        into: Path,
        previous: Stored | None,
        progress: Progress | None,
    ) -> Exported:
        """Write the generation's data into `into` (a new, empty directory). `previous`
        is the job's newest verified generation, which the export may build on."""
        ...

    def retire_snapshot(self, ctx: JobContext, snapshot: Snapshot, keep: int) -> None:
        """After the export: delete the snapshot, or keep the newest `keep` of gfs's own."""
        ...

    def undo_entry(self, ctx: JobContext, entry: JournalEntry) -> None:
        """Undo what an interrupted run journaled (a snapshot, a backup job): gfs's own only."""
        ...

    def health(self, job: Job) -> list[str]:
        """Warnings about the source that monitoring should hear (empty = fine)."""
        ...

    def verify_data(self, stored: Stored, progress: Progress | None) -> list[str]:
        """Problems of the generation's data beyond file checksums (empty = fine)."""
        ...

    def restore(
        self,
        ctx: JobContext,
        stored: Stored,
        to: Path,
        progress: Progress | None,
        options: RestoreOptions,
    ) -> None: ...
