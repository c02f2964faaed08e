"""Publishing and deleting generations on a target, journaled, crash-safe.

Publish: data goes into `<job>/.partial-<id>`, is fsynced, the manifest is written last,
then one rename makes the generation visible. Delete: one rename to `<job>/.pruning-<id>`
makes it invisible, then the tree is removed. A crash leaves only dot-names, which are
never listed and which the next run removes.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from gfs_backup.catalog import PARTIAL_PREFIX, PRUNING_PREFIX
from gfs_backup.faults import crash_point
from gfs_backup.manifest import Manifest, fsync_dir, write_manifest
from gfs_backup.state import State


def generation_id(created_at: datetime, job_dir: Path) -> str:
    """`YYYYmmddTHHMMSSZ` of the creation time, with -2, -3... if that name is taken."""
    base = created_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = base
    number = 1
    while (job_dir / candidate).exists():
        number += 1
        candidate = f"{base}-{number}"
    return candidate


class PartialGeneration:
    """A generation being written; `publish` or `abort` ends it."""

    def __init__(self, job_dir: Path, generation: str, state: State, run_id: int, job: str) -> None:
        self.job_dir = job_dir
        self.generation = generation
        self.path = job_dir / f"{PARTIAL_PREFIX}{generation}"
        self._state = state
        job_dir.mkdir(parents=True, exist_ok=True)
        self._entry = state.journal(run_id, job, "partial", str(self.path))
        self.path.mkdir(mode=0o700)

    def publish(self, manifest: Manifest) -> Path:
        """Write the manifest last and rename into place; return the generation's path."""
        write_manifest(self.path, manifest)
        final = self.job_dir / self.generation
        os.chmod(self.path, 0o755)
        os.rename(self.path, final)
        fsync_dir(self.job_dir)
        self._state.done(self._entry)
        return final

    def abort(self) -> None:
        """Remove everything written so far (after ENOSPC, an error, or a signal)."""
        remove_tree(self.path)
        self._state.done(self._entry)


def delete_generation(path: Path, state: State, run_id: int, job: str) -> None:
    """Make a generation invisible at once (rename), then remove it; journaled."""
    hidden = path.parent / f"{PRUNING_PREFIX}{path.name}"
    entry = state.journal(run_id, job, "prune", str(hidden), detail=path.name)
    os.rename(path, hidden)
    fsync_dir(path.parent)
    crash_point("mid-prune")
    remove_tree(hidden)
    state.done(entry)


def remove_tree(path: Path) -> None:
    """Remove a directory tree (read-only bits included); a missing path is fine."""
    if not path.exists() and not path.is_symlink():
        return

    def make_writable(function: object, name: str, _exc: object) -> None:
        os.chmod(os.path.dirname(name), 0o700)
        if os.path.isdir(name) and not os.path.islink(name):
            shutil.rmtree(name)
        else:
            os.unlink(name)

    shutil.rmtree(path, onerror=make_writable)
