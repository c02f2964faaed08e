"""What on this host no job backs up: libvirt domains, LVM logical volumes, btrfs subvolumes;
and the domains of the remote hosts libvirt jobs name (`host =`, the hosts of a cluster).

`gfs check` (exit 7) and `gfs status` name each one, so that a VM created next week, or a
volume nobody wrote a job for, is heard of before the day it is needed. Left out on
purpose, so that the list names what matters:

- `[coverage] ignore` patterns (domain names, `vg/lv`, subvolume paths);
- domains a `domains` job leaves out by its `exclude` or by their own metadata opt-out, and
  domains `gfs restore --as-domain` made (both listed apart, as "left out");
- LVs that back the disks of domains a job covers, thin pools, snapshots (gfs's own and
  others), swap, and the LVs mounted at `/`, `/boot` and `/var`;
- the btrfs subvolumes mounted at `/`, `/boot` and `/var`, those of container engines
  (docker, podman, systemd-nspawn, LXC), snapper's and gfs's own snapshots, and those
  below a path a btrfs or files job covers.

A host without libvirt, LVM or btrfs simply has nothing of that kind to report; a libvirtd
that does not answer is a problem line (nothing is assumed covered or uncovered).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from gfs_backup.actions.members import why_left_out
from gfs_backup.core.config import LOCAL_HOST, Config, Job
from gfs_backup.core.errors import GfsError
from gfs_backup.tools.btrfs import make_subvolume_list_command, parse_subvolume_list
from gfs_backup.tools.domainxml import gfs_metadata, parse_disks
from gfs_backup.tools.lvm import Volume, make_lvs_command, parse_lvs
from gfs_backup.tools.mounts import Mount, read_mounts
from gfs_backup.tools.virt import DEFAULT_URI, DomainInfo, list_domains
from gfs_backup.transport.runner import Command, LocalRunner, Runner
from gfs_backup.transport.ssh import SSHRunner, runner_for
from gfs_backup.transport.virttunnel import tunnel_for

T = TypeVar("T")
SYSTEM_MOUNTS = ("/", "/boot", "/var")
# Subvolumes of container engines and snapshot tools: not data anyone writes a job for.
SKIPPED_SUBVOLUME_PARTS = (
    "/var/lib/docker/",
    "/var/lib/containers/",
    "/var/lib/machines/",
    "/var/lib/lxc/",
    "/var/lib/portables/",
    "/.snapshots",
    "/.gfs-snapshots",
)


@dataclass(frozen=True)
class Uncovered:
    kind: str  # domain | lv | subvolume
    name: str  # domain name, vg/lv, subvolume path
    where: str  # the libvirt URI, the LV's device, the filesystem

    def line(self) -> str:
        return f"{self.kind} {self.name} ({self.where}) is backed up by no job"


@dataclass
class Coverage:
    uncovered: list[Uncovered] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (domain, why)
    problems: list[str] = field(default_factory=list)


def coverage(config: Config, runner: Runner | None = None) -> Coverage:
    """What on this machine no job of `config` covers (see the module's doc)."""
    runner = runner or LocalRunner()
    found = Coverage()
    ignored = list(config.coverage_ignore)
    local = [job for job in config.jobs if job.host == "local"]
    disks = _domains(local, ignored, found)
    _remote_domains(config, ignored, found)
    mounts = _mounts(found)
    _volumes(local, ignored, disks, mounts, runner, found)
    _subvolumes(local, ignored, mounts, runner, found)
    return found


def _domains(jobs: list[Job], ignored: list[str], found: Coverage) -> set[str]:
    """Uncovered domains of each libvirt URI the jobs use (the default one if libvirt is
    installed); returns the resolved disk paths of the covered domains."""
    virt = [job for job in jobs if job.kind == "libvirt"]
    uris = {str(job.options.get("uri", DEFAULT_URI)) for job in virt}
    if not uris and (shutil.which("virsh") or shutil.which("libvirtd")):
        uris = {DEFAULT_URI}
    covered_disks: set[str] = set()
    for uri in sorted(uris):
        try:
            domains = list_domains(uri)
        except GfsError as exc:
            found.problems.append(f"coverage: {exc}")
            continue
        for info in domains:
            jobs_here = [j for j in virt if str(j.options.get("uri", DEFAULT_URI)) == uri]
            covered, why = _domain_covered(jobs_here, info)
            if covered:
                covered_disks.update(_disk_paths(info))
            elif why:
                found.left_out.append((info.name, why))
            elif not _ignored(info.name, ignored):
                found.uncovered.append(Uncovered("domain", info.name, uri))
    return covered_disks


def _remote_domains(config: Config, ignored: list[str], found: Coverage) -> None:
    """Uncovered domains of each remote host a libvirt job runs on, and of every host of a
    cluster a job follows a domain across (a cluster job covers its domain on each host)."""
    virt = [job for job in config.jobs if job.kind == "libvirt"]
    places: dict[tuple[str, str], list[Job]] = {}
    for job in virt:
        uri = str(job.options.get("uri", DEFAULT_URI))
        cluster = job.options.get("cluster")
        hosts = config.clusters[str(cluster)].hosts if cluster else (job.host,)
        for host in hosts:
            if host != LOCAL_HOST:
                places.setdefault((host, uri), []).append(job)
    for (host, uri), jobs in sorted(places.items()):
        where = f"{uri} on host {host}"
        try:
            runner = runner_for(host, config)
            assert isinstance(runner, SSHRunner)
            domains = list_domains(where, tunnel_for(runner, uri).uri)
        except GfsError as exc:
            found.problems.append(f"coverage: {exc}")
            continue
        for info in domains:
            covered, why = _domain_covered(jobs, info)
            if why and not covered:
                found.left_out.append((f"{info.name} (host {host})", why))
            elif not covered and not _ignored(info.name, ignored):
                found.uncovered.append(Uncovered("domain", info.name, where))


def _domain_covered(jobs: list[Job], info: DomainInfo) -> tuple[bool, str]:
    """(covered, why left out on purpose) of a domain, given the libvirt jobs of its URI."""
    reasons = []
    for job in jobs:
        if not job.selects_domains:
            if job.options.get("domain") == info.name:
                return True, ""
            continue
        why = why_left_out(job, info)
        if why is None:
            return True, ""
        if why != "not matched":
            reasons.append(f"job {job.name}: {why}")
    if info.xml is not None and gfs_metadata(info.xml).get("restored-from"):
        reasons.append(f"made by gfs restore from {gfs_metadata(info.xml)['restored-from']}")
    return False, "; ".join(reasons)


def _disk_paths(info: DomainInfo) -> set[str]:
    if info.xml is None:
        return set()
    return {os.path.realpath(disk.source) for disk in parse_disks(info.xml) if disk.source}


def _mounts(found: Coverage) -> list[Mount]:
    try:
        return read_mounts()
    except (OSError, ValueError) as exc:
        found.problems.append(f"coverage: cannot read the mount table: {exc}")
        return []


def _system_devices(mounts: list[Mount]) -> set[str]:
    """Resolved devices of swap and of the filesystems mounted at /, /boot and /var."""
    devices = {os.path.realpath(m.source) for m in mounts if m.mount_point in SYSTEM_MOUNTS}
    try:
        lines = Path("/proc/swaps").read_text(encoding="utf-8").splitlines()[1:]
    except OSError:
        lines = []
    devices.update(os.path.realpath(line.split()[0]) for line in lines if line.strip())
    return devices


def _volumes(
    jobs: list[Job],
    ignored: list[str],
    domain_disks: set[str],
    mounts: list[Mount],
    runner: Runner,
    found: Coverage,
) -> None:
    if not shutil.which("lvs"):
        return
    volumes = _listed(runner, make_lvs_command(None), parse_lvs, found)
    if volumes is None:
        return
    covered = {str(job.options.get("volume")) for job in jobs if job.kind == "lvm"}
    system = _system_devices(mounts)
    for volume in volumes:
        name = f"{volume.vg}/{volume.name}"
        if name in covered or _ignored(name, ignored) or _not_data(volume):
            continue
        device = os.path.realpath(volume.path)
        if device in system or device in domain_disks or volume.path in domain_disks:
            continue
        found.uncovered.append(Uncovered("lv", name, volume.path))


def _listed(
    runner: Runner, command: Command, parse: Callable[[str], list[T]], found: Coverage
) -> list[T] | None:
    """`parse` of what `command` prints; None, with a problem line, when it fails."""
    done = runner.run(command, check=False)
    if done.returncode != 0:
        found.problems.append(f"coverage: {command} failed: {done.stderr.strip()[:200]}")
        return None
    try:
        return parse(done.stdout)
    except ValueError as exc:
        found.problems.append(f"coverage: {exc}")
        return None


def _not_data(volume: Volume) -> bool:
    """Thin pools, snapshots (old-style, thin with an origin, gfs's own)."""
    kind = volume.attr[:1]
    return (
        kind in ("t", "s", "S")
        or (kind == "V" and bool(volume.origin))
        or volume.name.startswith("gfs-")
    )


def _subvolumes(
    jobs: list[Job], ignored: list[str], mounts: list[Mount], runner: Runner, found: Coverage
) -> None:
    btrfs = [m for m in mounts if m.fstype == "btrfs"]
    if not btrfs or not shutil.which("btrfs"):
        return
    covered = [
        os.path.realpath(str(job.options.get("subvolume") or job.options.get("path")))
        for job in jobs
        if job.kind in ("btrfs", "files")
    ]
    skipped = [
        os.path.realpath(str(job.options["snapshot_dir"]))
        for job in jobs
        if job.options.get("snapshot_dir")
    ]
    system = {m.device for m in mounts if m.mount_point in SYSTEM_MOUNTS and m.fstype == "btrfs"}
    system_roots = {
        (m.device, m.root) for m in mounts if m.mount_point in SYSTEM_MOUNTS and m.fstype == "btrfs"
    }
    seen: set[str] = set()
    for mount in btrfs:
        if mount.device in seen:
            continue
        seen.add(mount.device)
        command = make_subvolume_list_command(Path(mount.mount_point))
        paths = _listed(runner, command, parse_subvolume_list, found)
        if paths is None:
            continue
        same_fs = [m for m in btrfs if m.device == mount.device]
        for relative in paths:
            inner = "/" + relative.strip("/")
            if (mount.device, inner) in system_roots:
                continue  # mounted at /, /boot or /var
            visible = _visible_path(inner, same_fs)
            shown = visible or f"{mount.source}:{inner}"
            if _skipped_subvolume(shown, visible, covered + skipped, ignored):
                continue
            if visible is None and mount.device in system:
                continue  # not mounted, on the system's own filesystem (e.g. @snapshots)
            found.uncovered.append(Uncovered("subvolume", shown, mount.source))


def _visible_path(inner: str, mounts: list[Mount]) -> str | None:
    """Where a subvolume (path from the filesystem's top) is seen, through the mounts of
    its filesystem (the deepest mount root that holds it)."""
    best: Mount | None = None
    for mount in mounts:
        root = mount.root.rstrip("/")
        holds = inner == root or inner.startswith(root + "/")
        if holds and (best is None or len(mount.root) > len(best.root)):
            best = mount
    if best is None:
        return None
    rest = inner[len(best.root.rstrip("/")) :]
    return (best.mount_point.rstrip("/") + rest) or "/"


def _skipped_subvolume(
    shown: str, visible: str | None, covered: list[str], ignored: list[str]
) -> bool:
    """Covered by a job's path (or below it: a btrfs or files job, a snapshot_dir), a
    container engine's or a snapshot tool's, or ignored by the configuration."""
    probe = (visible or shown).rstrip("/") + "/"
    if any(probe.startswith(path.rstrip("/") + "/") for path in covered):
        return True
    if any(part in probe for part in SKIPPED_SUBVOLUME_PARTS):
        return True
    return _ignored(shown, ignored)


def _ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
