"""What a host offers to back up and where to: its NFS mounts and its libvirt domains, asked
within a deadline (a dead NFS server or a hung libvirtd must not hang `gfs init` or a shell
completion). Used by `gfs init` and the shell completion."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.tools.domainxml import gfs_metadata, opted_out
from gfs_backup.tools.mounts import NFS_TYPES, Mount
from gfs_backup.tools.virt import DomainInfo
from gfs_backup.tools.virt import list_domains as virt_domains

T = TypeVar("T")


class TooSlow(GfsError):
    """A look-up did not finish within its deadline (it goes on in a daemon thread)."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class FoundDomain:
    """A domain as `gfs init` and the completion see it; `note` says why a `domains` job
    leaves it out by itself (its metadata), or what else is special about it."""

    name: str
    uuid: str = ""
    state: str = "shut off"  # or "running" (libvirt's active: running or paused)
    note: str = ""


def found_domain(info: DomainInfo) -> FoundDomain:
    """What `info` is worth saying about (pure: from its XML)."""
    notes = []
    if info.xml is None:
        notes.append(f"definition unreadable: {info.error}")
    elif opted_out(info.xml):
        notes.append('opted out: <gfs backup="no"/>')
    elif gfs_metadata(info.xml).get("restored-from"):
        notes.append("made by gfs restore: left out (include_restored)")
    if not info.persistent:
        notes.append("transient")
    state = "running" if info.active else "shut off"
    return FoundDomain(info.name, info.uuid, state, "; ".join(notes))


def nfs_mounts(mounts: list[Mount]) -> list[Mount]:
    """The NFS mounts of a mount table, in mount order, each mount point once (the mount
    made last on a point is the one in use)."""
    last: dict[str, Mount] = {}
    for mount in mounts:
        last.pop(mount.mount_point, None)  # keeps the order of the mount in use
        last[mount.mount_point] = mount
    return [mount for mount in last.values() if mount.fstype in NFS_TYPES]


def within(seconds: float, work: Callable[[], T]) -> T:
    """work() in a daemon thread, waited for at most `seconds`. Raises TooSlow when it did
    not finish (the thread is left behind: it ends with the process), else whatever
    work() raised."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="gfs-lookup", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TooSlow(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


def list_domains(uri: str) -> list[FoundDomain]:
    """Every domain defined or running at `uri`, by name. Raises VirtError when libvirt
    (or its Python module) is missing or libvirtd does not answer."""
    return [found_domain(info) for info in virt_domains(uri)]


def domains_within(uri: str, seconds: float) -> list[FoundDomain]:
    """`list_domains(uri)`, or TooSlow naming libvirtd after `seconds`."""
    try:
        return within(seconds, lambda: list_domains(uri))
    except TooSlow:
        raise TooSlow(f"libvirtd at {uri} did not answer within {seconds:g} s") from None
