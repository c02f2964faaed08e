"""Export targets: refuse to write anywhere that would not make a real backup.

A target must be a mounted filesystem (never an empty mount-point directory on the root
disk), must not be the filesystem of any source, and must be NFS unless the target says
`require_nfs = false`, which is reported as a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gfs_backup.core.config import Target
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.target.fs import LOCAL_FS, TargetFS
from gfs_backup.tools.mounts import NFS_TYPES, Mount, is_mount_point, mount_of


class TargetError(GfsError):
    """The target cannot take a backup now (unmounted, same filesystem, not NFS, ...)."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class TargetCheck:
    target: Target
    mount: Mount
    warnings: list[str] = field(default_factory=list)


def check_target(
    target: Target,
    sources: Sequence[Path],
    mounts: list[Mount] | None = None,
    fs: TargetFS = LOCAL_FS,
) -> TargetCheck:
    """Check `target` against the invariants on the host that mounts it (`fs`: this
    machine, or the remote host whose mount table is read); raise TargetError naming what
    to fix. `sources` are paths on that same host."""
    where = f"target {target.name} ({target.path})"
    if fs.host != "local":
        where = f"target {target.name} ({target.path} on host {fs.host})"
    if not fs.is_dir(target.path):
        raise TargetError(f"{where} does not exist: create the mount point and mount the share")
    mounts = fs.mounts() if mounts is None else mounts
    resolve = fs.realpath
    if not is_mount_point(target.path, mounts, resolve):
        raise TargetError(
            f"{where} is not a mounted filesystem (is the share mounted? gfs "
            "never writes into an unmounted mount point on the root disk)"
        )
    mount = mount_of(target.path, mounts, resolve)
    for source in sources:
        if mount_of(source, mounts, resolve).device == mount.device:
            raise TargetError(
                f"{where} is on the same filesystem as the source {source} "
                f"({mount.fstype} {mount.source}): a copy there is not a backup; "
                "use an NFS share or another disk"
            )
    warnings = []
    if mount.fstype not in NFS_TYPES:
        if target.require_nfs:
            raise TargetError(
                f"{where} is {mount.fstype}, not NFS: mount the NFS share there, "
                f"or set require_nfs = false in [target.{target.name}] for a "
                "local disk"
            )
        warnings.append(f"{where} is {mount.fstype}, not NFS (require_nfs = false)")
    return TargetCheck(target, mount, warnings)
