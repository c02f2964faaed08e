"""manifest.json: what a generation is, written last; the target alone is the catalog."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gfs_backup import __version__
from gfs_backup.copying.digest import ALGORITHM
from gfs_backup.target.fs import LOCAL_FS, TargetFS, fsync_dir

__all__ = ["MANIFEST", "DataFile", "Manifest", "ManifestError", "fsync_dir", "read_manifest"]

MANIFEST = "manifest.json"
DRILL_RECORDS = "drill-records"  # beside the manifest: results of drills from elsewhere
# 2: file trees record ctime, inode, hard links, the root, fifos and devices, `warnings`.
FORMAT = 2
READABLE_FORMATS = (1, 2)
MAX_HISTORY = 20


class ManifestError(ValueError):
    """A manifest that is missing, truncated or edited into something invalid."""


@dataclass(frozen=True)
class DataFile:
    """One data file of the generation, relative to its directory."""

    path: str
    size: int
    digest: str


@dataclass(frozen=True)
class Manifest:
    job: str
    kind: str
    host: str
    generation: str
    created_at: datetime
    files: tuple[DataFile, ...] = ()
    tree: tuple[dict[str, Any], ...] = ()  # file-tree entries (files jobs), see filetree
    labels: tuple[str, ...] = ()
    protected: bool = False
    point_in_time: bool = True
    source: dict[str, Any] = field(default_factory=dict)
    verify: tuple[dict[str, Any], ...] = ()
    drills: tuple[dict[str, Any], ...] = ()
    tool: str = f"gfs-backup {__version__}"
    digest_algorithm: str = ALGORITHM
    warnings: tuple[str, ...] = ()  # what the export found worth a human's look
    # A VM's drill check as its policy said (console, agent, timeout, memory, accel): what
    # `gfs drill --target` uses without the host's configuration.
    drill_check: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "job": self.job,
            "kind": self.kind,
            "host": self.host,
            "generation": self.generation,
            "created_at": self.created_at.astimezone(timezone.utc)
            .isoformat()
            .replace("+00:00", "Z"),
            "labels": list(self.labels),
            "protected": self.protected,
            "point_in_time": self.point_in_time,
            "tool": self.tool,
            "digest_algorithm": self.digest_algorithm,
            "source": self.source,
            "files": [{"path": f.path, "size": f.size, "digest": f.digest} for f in self.files],
            "tree": list(self.tree),
            "verify": list(self.verify),
            "drills": list(self.drills),
            "warnings": list(self.warnings),
            "drill_check": self.drill_check,
        }

    def with_verify(self, record: dict[str, Any]) -> Manifest:
        return replace(self, verify=(*self.verify, record)[-MAX_HISTORY:])

    def with_drill(self, record: dict[str, Any]) -> Manifest:
        return replace(self, drills=(*self.drills, record)[-MAX_HISTORY:])


def _field(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: {key!r} has the wrong type")
    return value


def _optional_list(data: dict[str, Any], key: str, where: str) -> list[Any]:
    return _field(data, key, list, where) if key in data else []


def parse_manifest(text: str, where: str) -> Manifest:
    """Validate a manifest's JSON. Raises ManifestError naming `where` and the bad field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}): truncated or edited by hand"
        ) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    version = data.get("format")
    if type(version) is int and version > FORMAT:
        raise ManifestError(
            f"{where}: manifest format {version} was written by a newer gfs (this "
            f"{__version__} reads formats up to {FORMAT}): upgrade gfs to use this generation"
        )
    if version not in READABLE_FORMATS or type(version) is not int:
        raise ManifestError(f"{where}: unknown manifest format {version!r}")
    try:
        created = datetime.fromisoformat(
            _field(data, "created_at", str, where).replace("Z", "+00:00")
        )
    except ValueError:
        raise ManifestError(f"{where}: 'created_at' is not an ISO-8601 time") from None
    if created.tzinfo is None:
        raise ManifestError(f"{where}: 'created_at' has no UTC offset")
    files = []
    for index, item in enumerate(_field(data, "files", list, where)):
        spot = f"{where}: files[{index}]"
        if not isinstance(item, dict):
            raise ManifestError(f"{spot}: not an object")
        path = _field(item, "path", str, spot)
        if path.startswith("/") or ".." in path.split("/") or not path:
            raise ManifestError(f"{spot}: unsafe path {path!r}")
        size = _field(item, "size", int, spot)
        if size < 0:
            raise ManifestError(f"{spot}: negative size")
        files.append(DataFile(path, size, _field(item, "digest", str, spot)))
    return Manifest(
        job=_field(data, "job", str, where),
        kind=_field(data, "kind", str, where),
        host=_field(data, "host", str, where),
        generation=_field(data, "generation", str, where),
        created_at=created,
        files=tuple(files),
        tree=tuple(_field(data, "tree", list, where)),
        labels=tuple(str(label) for label in _field(data, "labels", list, where)),
        protected=_field(data, "protected", bool, where),
        point_in_time=_field(data, "point_in_time", bool, where),
        source=_field(data, "source", dict, where),
        verify=tuple(_optional_list(data, "verify", where)),
        drills=tuple(_optional_list(data, "drills", where)),
        tool=str(data.get("tool", "")),
        digest_algorithm=_field(data, "digest_algorithm", str, where),
        warnings=tuple(str(line) for line in _optional_list(data, "warnings", where)),
        drill_check=_field(data, "drill_check", dict, where) if "drill_check" in data else {},
    )


def read_manifest(generation_dir: Path, fs: TargetFS = LOCAL_FS) -> Manifest:
    """The generation's manifest, read through `fs`, with the drill results recorded beside
    it (`drill_records`). Raises ManifestError naming the file."""
    path = generation_dir / MANIFEST
    try:
        text = fs.read_text(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from None
    manifest = parse_manifest(text, str(path))
    if fs is LOCAL_FS and (generation_dir / DRILL_RECORDS).is_dir():
        extra = drill_records(generation_dir)
        if extra:
            drills = sorted((*manifest.drills, *extra), key=lambda r: str(r.get("time", "")))
            manifest = replace(manifest, drills=tuple(drills)[-MAX_HISTORY:])
    return manifest


def drill_records(generation_dir: Path) -> list[dict[str, Any]]:
    """The drill results written beside the manifest by drills away from the host
    (`gfs drill --target --record`): one file each, written atomically, so such a drill
    never rewrites the manifest the host's own runs rewrite. Untrusted: a record that is
    not an object with a string `time` and an `outcome` of pass or fail is left out."""
    found = []
    folder = generation_dir / DRILL_RECORDS
    for entry in sorted(folder.glob("*.json")):
        try:
            record = json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("time"), str)
            and record.get("outcome") in ("pass", "fail")
        ):
            found.append(record)
    return found


def write_manifest(generation_dir: Path, manifest: Manifest, fs: TargetFS = LOCAL_FS) -> None:
    """Write atomically through `fs`: a temporary file, fsynced, renamed over, directory
    fsynced."""
    data = json.dumps(manifest.to_json(), indent=2, sort_keys=False).encode() + b"\n"
    fs.write_file(generation_dir / MANIFEST, data)
