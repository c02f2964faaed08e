"""The generations on a target: `<target>/<job>/<generation-id>/manifest.json`.

The target alone is the catalog. Names starting with a dot (`.partial-*` exports in
progress, `.pruning-*` deletions in progress) are never listed; a directory without a
valid manifest is not a generation and is reported, never planned, pruned or restored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gfs_backup.core.errors import Problem
from gfs_backup.retention import Generation
from gfs_backup.target.fs import LOCAL_FS, TargetFS
from gfs_backup.target.manifest import MANIFEST, Manifest, ManifestError, read_manifest

PARTIAL_PREFIX = ".partial-"
PRUNING_PREFIX = ".pruning-"


@dataclass(frozen=True)
class Stored:
    """A published generation: its directory and manifest."""

    path: Path
    manifest: Manifest
    fs: TargetFS = field(default=LOCAL_FS, compare=False)  # where `path` is

    @property
    def id(self) -> str:
        return self.path.name

    def as_generation(self) -> Generation:
        return Generation(self.id, self.manifest.created_at, self.manifest.protected)


def last_verified_ok(stored: Stored) -> bool:
    """Whether the generation's latest verify (after export, or later) passed."""
    return bool(stored.manifest.verify) and stored.manifest.verify[-1].get("result") == "ok"


def newest_verified(stored: list[Stored]) -> Stored | None:
    """The newest generation whose latest verify passed: what a new export may build on."""
    return next((item for item in reversed(stored) if last_verified_ok(item)), None)


@dataclass(frozen=True)
class Listing:
    stored: list[Stored]
    problems: list[Problem]

    @property
    def generations(self) -> list[Generation]:
        return [item.as_generation() for item in self.stored]

    def by_id(self) -> dict[str, Stored]:
        return {item.id: item for item in self.stored}


def list_generations(job_dir: Path, fs: TargetFS = LOCAL_FS) -> Listing:
    """Generations of one job, oldest first, and a problem per unreadable manifest.

    A missing `job_dir` is an empty listing: no export has happened yet. `fs` is where
    the target is mounted (this machine or a remote host).
    """
    stored: list[Stored] = []
    problems: list[Problem] = []
    for entry in fs.entries(job_dir):
        if entry.name.startswith(".") or entry.kind != "d":
            continue
        path = job_dir / entry.name
        try:
            stored.append(Stored(path, read_manifest(path, fs), fs))
        except ManifestError as exc:
            if str(exc).endswith(f"{MANIFEST}: missing"):
                problems.append(Problem(str(path), "no manifest: not a generation, left alone"))
            else:
                problems.append(Problem("", f"{exc}; generation left out of planning and pruning"))
    stored.sort(key=lambda item: item.manifest.created_at)
    return Listing(stored, problems)
