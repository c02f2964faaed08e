"""The generations on a target: `<target>/<job>/<generation-id>/manifest.json`.

The target alone is the catalog. A directory without a readable manifest is not a
generation (partial exports are named `.partial-*` and never listed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gfs_backup.errors import Problem
from gfs_backup.retention import Generation

MANIFEST = "manifest.json"
PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class Listing:
    generations: list[Generation]
    problems: list[Problem]


def list_generations(job_dir: Path) -> Listing:
    """Generations of one job, and one problem per unreadable manifest (left out, not pruned).

    A missing `job_dir` is an empty listing: no export has happened yet.
    """
    generations: list[Generation] = []
    problems: list[Problem] = []
    if not job_dir.is_dir():
        return Listing(generations, problems)
    for entry in sorted(job_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        manifest = entry / MANIFEST
        if not manifest.is_file():
            continue
        try:
            generations.append(_read_manifest(manifest, entry.name))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(
                Problem(
                    str(manifest), f"unreadable manifest, generation left out of planning ({exc})"
                )
            )
    return Listing(generations, problems)


def _read_manifest(path: Path, generation_id: str) -> Generation:
    data = json.loads(path.read_text(encoding="utf-8"))
    created = datetime.fromisoformat(str(data["created_at"]).replace("Z", "+00:00"))
    if created.tzinfo is None:
        raise ValueError("created_at has no UTC offset")
    return Generation(generation_id, created, bool(data.get("protected", False)))
