"""`gfs verify`: re-read generations, check every checksum, record the result."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from gfs_backup.backends import backend_for
from gfs_backup.backends.base import Progress
from gfs_backup.copying.copy import digest_file
from gfs_backup.copying.digest import ALGORITHM
from gfs_backup.target.catalog import Stored, last_verified_ok
from gfs_backup.target.fs import LOCAL_FS, FileDigest
from gfs_backup.target.manifest import DataFile, write_manifest

__all__ = ["Verified", "check_data", "last_check_time", "last_verified_ok", "verify_stored"]


@dataclass(frozen=True)
class Verified:
    stored: Stored
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_data(
    stored: Stored, progress: Progress | None = None, *, read_back: bool = False
) -> list[str]:
    """Every data file's size and checksum (the manifest's digest_algorithm, computed where
    the target is mounted), then the kind's own checks; one line each. `read_back`: the
    export already read back from the target what it wrote (copy.py's read-back, a files
    export's verify, the image writer on a target's host): only the sizes are checked
    again (on a remote target: that each file exists), and the kind's own checks, which it
    ran, are not repeated."""
    problems = []
    for data in stored.manifest.files:
        try:
            if read_back and stored.fs is LOCAL_FS:
                result = FileDigest(_regular_file_size(stored.path / data.path), data.digest)
            elif read_back:
                if not stored.fs.exists(stored.path / data.path):
                    raise FileNotFoundError(data.path)
                result = FileDigest(data.size, data.digest)
            else:
                result = _digest(stored, data, progress)
        except FileNotFoundError:
            problems.append(f"{data.path}: missing")
            continue
        except OSError as exc:
            problems.append(f"{data.path}: unreadable ({exc.strerror})")
            continue
        if result.size != data.size:
            problems.append(f"{data.path}: size {result.size}, manifest says {data.size}")
        elif result.digest != data.digest:
            problems.append(f"{data.path}: checksum mismatch (data corrupted)")
    if not read_back:
        problems += backend_for(stored.manifest.kind).verify_data(stored, progress)
    return problems


def _regular_file_size(path: Path) -> int:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    return st.st_size


def _digest(stored: Stored, data: DataFile, progress: Progress | None) -> FileDigest:
    """A data file's size and checksum; sha256-1m here with progress, else through the
    target's filesystem (a remote target: `sha256sum` on its host, only the digest comes
    back). OSError for a missing or unreadable file."""
    path = stored.path / data.path
    if stored.fs is LOCAL_FS and stored.manifest.digest_algorithm == ALGORITHM:
        result = digest_file(path, progress, uncached=True)  # the disk's, not the cache's
        return FileDigest(result.size, result.digest)
    return stored.fs.file_digest(path, stored.manifest.digest_algorithm)


def verify_stored(
    stored: Stored, now: datetime, record: bool = True, progress: Progress | None = None
) -> Verified:
    """Check a generation; with `record`, append the result to its manifest."""
    problems = check_data(stored, progress)
    if record:
        entry = {
            "time": now.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            "result": "ok" if not problems else "failed",
            "problems": problems[:20],
        }
        manifest = stored.manifest.with_verify(entry)
        write_manifest(stored.path, manifest, stored.fs)
        stored = replace(stored, manifest=manifest)
    return Verified(stored, problems)


def last_check_time(stored: Stored) -> datetime:
    """When the generation was last verified (its creation time if never)."""
    for record in reversed(stored.manifest.verify):
        try:
            return datetime.fromisoformat(str(record.get("time", "")).replace("Z", "+00:00"))
        except ValueError:
            continue
    return stored.manifest.created_at
