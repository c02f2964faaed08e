"""The job kinds gfs can back up (libvirt, lvm, btrfs, files): one registry, one contract
(base.Backend). Imports `target`, `copying`, `tools`, `transport`, `core`; never `actions`."""

from __future__ import annotations

from gfs_backup.backends.base import Backend
from gfs_backup.backends.btrfs import BtrfsBackend
from gfs_backup.backends.files import FilesBackend
from gfs_backup.backends.libvirt import LibvirtBackend
from gfs_backup.backends.lvm import LvmBackend
from gfs_backup.core.errors import GfsError

BACKENDS: dict[str, Backend] = {
    "btrfs": BtrfsBackend(),
    "files": FilesBackend(),
    "libvirt": LibvirtBackend(),
    "lvm": LvmBackend(),
}


def backend_for(kind: str) -> Backend:
    """The backend of a job kind; GfsError for kinds configured but not built yet."""
    try:
        return BACKENDS[kind]
    except KeyError:
        raise GfsError(
            f"job kind {kind!r} cannot run on this version of gfs yet "
            f"(available: {', '.join(BACKENDS)})"
        ) from None
