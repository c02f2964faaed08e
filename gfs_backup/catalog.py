"""The generations on a target: `<target>/<job>/<generation-id>/manifest.json`.

The target alone is the catalog. Names starting with a dot (`.partial-*` exports in
progress, `.pruning-*` deletions in progress) are never listed; a directory without a
valid manifest is not a generation and is reported, never planned, pruned or restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gfs_backup.errors import Problem
from gfs_backup.manifest import MANIFEST, Manifest, ManifestError, read_manifest
from gfs_backup.retention import Generation

PARTIAL_PREFIX = ".partial-"
PRUNING_PREFIX = ".pruning-"


@dataclass(frozen=True)
class Stored:
    """A published generation: its directory and manifest."""

    path: Path
    manifest: Manifest

    @property
    def id(self) -> str:
        return self.path.name

    def as_generation(self) -> Generation:
        return Generation(self.id, self.manifest.created_at, self.manifest.protected)


@dataclass(frozen=True)
class Listing:
    stored: list[Stored]
    problems: list[Problem]

    @property
    def generations(self) -> list[Generation]:
        return [item.as_generation() for item in self.stored]

    def by_id(self) -> dict[str, Stored]:
        return {item.id: item for item in self.stored}


def list_generations(job_dir: Path) -> Listing:
    """Generations of one job, oldest first, and a problem per unreadable manifest.

    A missing `job_dir` is an empty listing: no export has happened yet.
    """
    stored: list[Stored] = []
    problems: list[Problem] = []
    if not job_dir.is_dir():
        return Listing(stored, problems)
    for entry in sorted(job_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink():
            continue
        if not (entry / MANIFEST).exists():
            problems.append(Problem(str(entry), "no manifest: not a generation, left alone"))
            continue
        try:
            stored.append(Stored(entry, read_manifest(entry)))
        except ManifestError as exc:
            problems.append(Problem("", f"{exc}; generation left out of planning and pruning"))
    stored.sort(key=lambda item: item.manifest.created_at)
    return Listing(stored, problems)
