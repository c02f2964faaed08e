"""Publishing and deleting generations on a target, journaled, crash-safe.

Publish: data goes into `<job>/.partial-<id>`, is fsynced, the manifest is written last,
then one rename makes the generation visible. Delete: one rename to `<job>/.pruning-<id>`
makes it invisible, then the tree is removed. A crash leaves only dot-names, which are
never listed and which the next run removes. Every file operation goes through the
target's `TargetFS` (this machine, or the remote host that mounts the target).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from gfs_backup.core.faults import crash_point
from gfs_backup.core.state import State
from gfs_backup.target.catalog import PARTIAL_PREFIX, PRUNING_PREFIX
from gfs_backup.target.fs import LOCAL_FS, TargetFS, remove_tree
from gfs_backup.target.manifest import Manifest, write_manifest

__all__ = ["PartialGeneration", "delete_generation", "generation_id", "remove_tree"]


def generation_id(created_at: datetime, job_dir: Path, fs: TargetFS = LOCAL_FS) -> str:
    """`YYYYmmddTHHMMSSZ` of the creation time, with -2, -3... if that name is taken."""
    base = created_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    taken = {entry.name for entry in fs.entries(job_dir)}
    candidate = base
    number = 1
    while candidate in taken:
        number += 1
        candidate = f"{base}-{number}"
    return candidate


class PartialGeneration:
    """A generation being written; `publish` or `abort` ends it."""

    def __init__(
        self,
        job_dir: Path,
        generation: str,
        state: State,
        run_id: int,
        job: str,
        fs: TargetFS = LOCAL_FS,
    ) -> None:
        self.job_dir = job_dir
        self.generation = generation
        self.path = job_dir / f"{PARTIAL_PREFIX}{generation}"
        self.fs = fs
        self._state = state
        self._entry = state.journal(run_id, job, "partial", str(self.path))
        fs.make_dir(self.path, 0o700)

    def publish(self, manifest: Manifest, read_group: str | None = None) -> Path:
        """Write the manifest last and rename into place; return the generation's path.
        The generation is for root only (mode 0750, root's group: backups hold secrets),
        or with `read_group` readable by that group too (a CI runner's drills)."""
        write_manifest(self.path, manifest, self.fs)
        final = self.job_dir / self.generation
        if read_group:
            self.fs.share_with_group(self.path, read_group)
        self.fs.chmod(self.path, 0o750)
        self.fs.rename(self.path, final)
        self._state.done(self._entry)
        return final

    def abort(self) -> None:
        """Remove everything written so far (after ENOSPC, an error, or a signal)."""
        self.fs.remove_tree(self.path)
        self._state.done(self._entry)


def delete_generation(
    path: Path, state: State, run_id: int, job: str, fs: TargetFS = LOCAL_FS
) -> None:
    """Make a generation invisible at once (rename), then remove it; journaled."""
    hidden = path.parent / f"{PRUNING_PREFIX}{path.name}"
    entry = state.journal(run_id, job, "prune", str(hidden), detail=path.name)
    fs.rename(path, hidden)
    crash_point("mid-prune")
    fs.remove_tree(hidden)
    state.done(entry)
