"""The main configuration (/etc/gfs/gfs.toml): targets, hosts and jobs, validated at once.

state_dir = "/var/lib/gfs"          # run history and journal (default)
policy_dir = "/etc/gfs/policies"    # where policy names are looked up first
[target.nas]
path = "/mnt/backup"                # must be an NFS mount unless require_nfs = false
require_nfs = true
host = "local"                      # the host that mounts it (path as that host sees it)
io_timeout = 600                    # seconds a remote target may not answer (hard NFS)
[hosts.kvm2]                        # remote host; "local" needs no entry
address = "kvm2.example.net"
user = "backup"
port = 22
[[job]]
name = "db01"
kind = "lvm"                        # libvirt | lvm | btrfs | files
volume = "vg0/db01"
host = "kvm2"                       # lvm and btrfs jobs: the others read this machine
target = "nas"
policy = "classic-gfs"              # a policy name, a path, or an inline table
scratch_dir = "/var/tmp"            # where `gfs drill` restores (btrfs jobs: on btrfs)
[[job]]
name = "vms"
kind = "libvirt"
domains = ["*"]                     # glob patterns: every domain, now and later (or domain =)
exclude = ["test-*"]                # patterns left out; a domain may opt out in its metadata
exclude_disks = ["vdz"]             # disk targets (patterns) not backed up
max_parallel = 1                    # domains of this job backed up at once
[files]                             # defaults of files jobs (a job may set its own)
rehash_every = "30d"                # read every file again this often ("off": never)
[incremental]                       # changed-block capture of libvirt and thin lvm jobs
full_every = "30d"                  # read the whole disk this often anyway ("off": never)
base_verified_within = "7d"         # build only on a generation fully verified this recently
[coverage]                          # what `gfs check` need not name as backed up by no job
ignore = ["test-*", "vg0/scratch", "/srv/tmp"]  # domains, vg/lv, subvolume paths (patterns)
"""

from __future__ import annotations

import grp
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gfs_backup.core.errors import InputError, Problem
from gfs_backup.core.lvmnames import LvmInputError, parse_size, split_volume
from gfs_backup.core.policy import (
    NAME_RE,
    Policy,
    find_policy,
    load_policy_file,
    parse_duration,
    policy_from_table,
)
from gfs_backup.core.throttle import parse_rate
from gfs_backup.core.validate import Collector, Table, join_key, read_toml

DEFAULT_CONFIG = Path("/etc/gfs/gfs.toml")
DEFAULT_STATE_DIR = Path("/var/lib/gfs")
LOCAL_HOST = "local"
DEFAULT_LIBVIRT_URI = "qemu:///system"
# Kinds whose remote jobs write into a target their host mounts (the data never crosses
# SSH): the tree agent of files jobs, and QEMU of libvirt jobs, on that host.
ON_HOST_KINDS = ("files", "libvirt")
TOP_KEYS = (
    "state_dir",
    "policy_dir",
    "concurrency",
    "target",
    "hosts",
    "cluster",
    "job",
    "files",
    "incremental",
    "coverage",
    "metrics",
    "notify",
    "ping_url",
)
FILES_KEYS = ("rehash_every",)
COVERAGE_KEYS = ("ignore",)
DEFAULT_REHASH_EVERY = "30d"
INCREMENTAL_KEYS = ("full_every", "base_verified_within")
DEFAULT_FULL_EVERY = "30d"
DEFAULT_BASE_VERIFIED_WITHIN = "7d"
TARGET_KEYS = (
    "path",
    "require_nfs",
    "bandwidth",
    "host",
    "cluster",
    "io_timeout",
    "read_group",
)
CLUSTER_KEYS = ("hosts",)
DEFAULT_IO_TIMEOUT = 600.0
HOST_KEYS = ("address", "user", "port", "identity_file", "known_hosts")
JOB_COMMON_KEYS = ("name", "kind", "host", "target", "policy", "scratch_dir")
# Operations keys of every job, validated by the section parser of gfs_backup/ops.
JOB_OPS_KEYS = ("hooks", "ping_url", "max_age", "max_verify_age", "max_drill_age")
PATH_KEYS = ("path", "subvolume", "snapshot_dir", "overlay_dir", "scratch_dir")
# Per kind: (required keys, optional keys).
KIND_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "libvirt": (
        (),  # `domain` or `domains` (checked in _check_libvirt)
        (
            "domain",
            "domains",
            "exclude",
            "include_restored",
            "max_parallel",
            "exclude_disks",
            "disks",
            "uri",
            "cluster",
            "quiesce",
            "method",
            "overlay_dir",
            "incremental",
            "full_every",
            "base_verified_within",
        ),
    ),
    "lvm": (
        ("volume",),
        (
            "snapshot_size",
            "format",
            "incremental",
            "full_every",
            "base_verified_within",
            "thin_pool_max_percent",
        ),
    ),
    "btrfs": (("subvolume",), ("snapshot_dir",)),
    "files": (("path",), ("snapshot_dir", "rehash_every")),
}


@dataclass(frozen=True)
class Target:
    name: str
    path: Path
    require_nfs: bool = True
    bandwidth: int = 0  # bytes/s all jobs together may write to it; 0 = no limit
    host: str = "local"  # the host that mounts it; a job writing to it must run there
    io_timeout: float = DEFAULT_IO_TIMEOUT  # seconds without progress on a remote target
    read_group: str | None = None  # may read VM generations (a CI runner's drills)
    # The cluster whose every host mounts it at `path` (its shared NFS share); `host` is
    # then the cluster's first host, through which gfs reads it outside a job's run.
    cluster: str | None = None


@dataclass(frozen=True)
class Cluster:
    """KVM hosts sharing storage and a backup share, whose domains move between them."""

    name: str
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    user: str = "root"
    port: int = 22
    identity_file: str | None = None
    known_hosts: str | None = None


@dataclass(frozen=True)
class Job:
    """One thing to protect; `options` holds the kind's own keys (domain, subvolume, ...).

    A libvirt job with `domains` patterns is configured once and runs as one member job per
    domain it selects (`parent` = the configured job's name): the member's `name` is
    `JOB@UUID` (its key in the state database, locks and logs: stable when the domain is
    renamed), `options` carry the domain's name, `uuid` and `history` (the directory of its
    generations below the job's, see gfs_backup/actions/members.py)."""

    name: str
    kind: str
    host: str
    target: str
    policy: Policy
    options: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None

    @property
    def family(self) -> str:
        """The configured job's name (hooks, operations settings, checkpoint names)."""
        return self.parent or self.name

    @property
    def title(self) -> str:
        """How people see the job: `JOB/DOMAIN` for a member, else its name."""
        if self.parent is None:
            return self.name
        return f"{self.parent}/{self.options.get('domain', '?')}"

    @property
    def selects_domains(self) -> bool:
        """A libvirt job with `domains` patterns (not yet one of its members)."""
        return self.parent is None and self.kind == "libvirt" and "domains" in self.options


@dataclass(frozen=True)
class Config:
    source: str
    state_dir: Path
    policy_dir: Path
    targets: dict[str, Target]
    hosts: dict[str, Host]
    jobs: list[Job]
    concurrency: int = 1  # jobs `gfs run` runs at once
    # Patterns of domains, `vg/lv` and subvolume paths no job needs to cover ([coverage]).
    coverage_ignore: tuple[str, ...] = ()
    # What registered section parsers made of their keys (see `register_section`).
    sections: dict[str, Any] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)


# Parsers of settings that belong to higher layers (operations: [notify], [metrics], the
# jobs' hooks, ...): each gets the whole table, the collector and the jobs, reports its
# problems with the others (one `gfs check` shows them all), and returns its settings.
SectionParser = Callable[[Table, Collector, list[Job]], Any]
_SECTIONS: dict[str, SectionParser] = {}


def register_section(name: str, parser: SectionParser) -> None:
    """Have `load_config` run `parser`; its result is `Config.sections[name]`."""
    _SECTIONS[name] = parser


def load_config(path: Path) -> Config:
    """Read and validate the config and every policy it names; raises InputError with all."""
    table = read_toml(path)
    collector = Collector(str(path))
    collector.unknown_keys(table, TOP_KEYS, "")
    state_dir = Path(
        collector.get(table, "state_dir", "", str, str(DEFAULT_STATE_DIR), "a directory path")
    )
    policy_dir = Path(
        collector.get(table, "policy_dir", "", str, "/etc/gfs/policies", "a directory path")
    )
    targets = {
        name: _target(name, value, collector)
        for name, value in _named_tables(table, "target", collector)
    }
    hosts = {
        name: _host(name, value, collector)
        for name, value in _named_tables(table, "hosts", collector)
    }
    clusters = {
        name: _cluster(name, value, collector, hosts)
        for name, value in _named_tables(table, "cluster", collector)
    }
    for name, target in list(targets.items()):
        if target.cluster is not None:
            targets[name] = _cluster_target(target, clusters, collector)
            continue
        if target.host != LOCAL_HOST and target.host not in hosts:
            collector.add(
                join_key(f"target.{target.name}", "host"),
                f"unknown host {target.host!r}: add [hosts.{target.host}] or use 'local'",
            )
    files_defaults = collector.get(table, "files", "", dict, {}, "a [files] table")
    collector.unknown_keys(files_defaults, FILES_KEYS, "files")
    incremental_defaults = collector.get(
        table, "incremental", "", dict, {}, "an [incremental] table"
    )
    collector.unknown_keys(incremental_defaults, INCREMENTAL_KEYS, "incremental")
    jobs = _jobs(table, collector, targets, hosts, clusters, policy_dir)
    for job in jobs:
        if job.kind == "files":
            off = "to never read every file again"
            _set_every(job, "rehash_every", files_defaults, DEFAULT_REHASH_EVERY, collector, off)
        if job.kind in ("libvirt", "lvm"):
            off = "to read the whole disk only when needed"
            _set_every(job, "full_every", incremental_defaults, DEFAULT_FULL_EVERY, collector, off)
            off = "to build on a base however long ago it was verified"
            default = DEFAULT_BASE_VERIFIED_WITHIN
            _set_every(job, "base_verified_within", incremental_defaults, default, collector, off)
    concurrency = collector.get(table, "concurrency", "", int, 1, "a number of jobs")
    if not 1 <= concurrency <= 64:
        collector.add("concurrency", f"{concurrency} is not allowed: run 1 to 64 jobs at once")
    coverage = collector.get(table, "coverage", "", dict, {}, "a [coverage] table")
    collector.unknown_keys(coverage, COVERAGE_KEYS, "coverage")
    ignore = coverage.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(item, str) and item for item in ignore):
        collector.add(
            "coverage.ignore",
            'must be a list of patterns: domain names, "vg/lv", subvolume paths',
        )
        ignore = []
    sections = {name: parser(table, collector, jobs) for name, parser in _SECTIONS.items()}
    collector.raise_if_any()
    return Config(
        str(path),
        state_dir,
        policy_dir,
        targets,
        hosts,
        jobs,
        concurrency,
        tuple(ignore),
        sections,
        clusters,
    )


def _named_tables(table: Table, key: str, collector: Collector) -> list[tuple[str, Table]]:
    section: Table = collector.get(table, key, "", dict, {}, f"tables [{key}.NAME]")
    result: list[tuple[str, Table]] = []
    for name, value in section.items():
        if not NAME_RE.fullmatch(name):
            collector.add(join_key(key, name), "invalid name: use letters, digits, '.', '_', '-'")
        elif not isinstance(value, dict):
            collector.add(join_key(key, name), f"expected a table [{key}.{name}]")
        else:
            result.append((name, value))
    return result


def _target(name: str, table: Table, collector: Collector) -> Target:
    path = f"target.{name}"
    collector.unknown_keys(table, TARGET_KEYS, path)
    where = collector.get(table, "path", path, str, "", "an absolute directory path")
    if not where.startswith("/"):
        collector.add(join_key(path, "path"), "required: the absolute path of the mount point")
    require_nfs = collector.get(table, "require_nfs", path, bool, True, "true or false")
    bandwidth = 0
    try:
        bandwidth = parse_rate(table.get("bandwidth", 0))
    except ValueError as exc:
        collector.add(join_key(path, "bandwidth"), str(exc))
    host = collector.get(table, "host", path, str, LOCAL_HOST, "a host name")
    io_timeout = table.get("io_timeout", DEFAULT_IO_TIMEOUT)
    if isinstance(io_timeout, bool) or not isinstance(io_timeout, (int, float)):
        collector.add(join_key(path, "io_timeout"), "expected a number of seconds")
        io_timeout = DEFAULT_IO_TIMEOUT
    elif not 1 <= io_timeout <= 86400:
        collector.add(join_key(path, "io_timeout"), f"{io_timeout} is not 1 to 86400 seconds")
    if bandwidth and (host != LOCAL_HOST or "cluster" in table):
        collector.add(
            join_key(path, "bandwidth"),
            f"cannot be enforced on a target of host {host!r}: the copy runs there; "
            "remove it (limit the host's NFS traffic there instead)",
        )
    read_group = collector.get(table, "read_group", path, str, None, "a group name")
    if read_group is not None:
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", read_group):
            collector.add(join_key(path, "read_group"), f"{read_group!r} is not a group name")
        elif host == LOCAL_HOST and not _group_exists(read_group):
            collector.add(
                join_key(path, "read_group"),
                f"group {read_group!r} does not exist on this machine: create it (groupadd) "
                "with the same GID as on the machines that drill from the share",
            )
    cluster = collector.get(table, "cluster", path, str, None, "a cluster name")
    return Target(
        name,
        Path(where),
        require_nfs,
        bandwidth,
        host,
        float(io_timeout),
        read_group,
        cluster,
    )


def _cluster(name: str, table: Table, collector: Collector, hosts: dict[str, Host]) -> Cluster:
    path = f"cluster.{name}"
    collector.unknown_keys(table, CLUSTER_KEYS, path)
    members = table.get("hosts")
    if (
        not isinstance(members, list)
        or not members
        or not all(isinstance(m, str) and m for m in members)
    ):
        collector.add(join_key(path, "hosts"), 'required: the hosts, e.g. ["kvm1", "kvm2"]')
        return Cluster(name, ())
    for member in members:
        if member not in hosts:
            collector.add(
                join_key(path, "hosts"),
                f"unknown host {member!r}: add [hosts.{member}] (a cluster's hosts are "
                "reached by SSH, also this machine's)",
            )
    if len(set(members)) != len(members):
        collector.add(join_key(path, "hosts"), "names a host twice")
    return Cluster(name, tuple(members))


def _cluster_target(target: Target, clusters: dict[str, Cluster], collector: Collector) -> Target:
    """A target mounted by every host of a cluster: read through its first host."""
    path = f"target.{target.name}"
    if target.host != LOCAL_HOST:
        collector.add(join_key(path, "cluster"), "name the cluster or one host, not both")
    cluster = clusters.get(str(target.cluster))
    if cluster is None:
        collector.add(
            join_key(path, "cluster"),
            f"unknown cluster {target.cluster!r}: add [cluster.{target.cluster}] hosts = [...]",
        )
        return target
    if not cluster.hosts:
        return target
    return replace(target, host=cluster.hosts[0])


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _host(name: str, table: Table, collector: Collector) -> Host:
    path = f"hosts.{name}"
    collector.unknown_keys(table, HOST_KEYS, path)
    if name == LOCAL_HOST:
        collector.add(path, "'local' is the host gfs runs on and needs no entry")
    address = collector.get(table, "address", path, str, "", "a host name or address")
    if not address:
        collector.add(join_key(path, "address"), "required: the host name or IP address")
    port = collector.get(table, "port", path, int, 22, "a TCP port number")
    if not 0 < port < 65536:
        collector.add(join_key(path, "port"), f"{port} is not a TCP port (1..65535)")
    return Host(
        name=name,
        address=address,
        user=collector.get(table, "user", path, str, "root", "a user name"),
        port=port,
        identity_file=collector.get(table, "identity_file", path, str, None, "a file path"),
        known_hosts=collector.get(table, "known_hosts", path, str, None, "a file path"),
    )


def _jobs(
    table: Table,
    collector: Collector,
    targets: dict[str, Target],
    hosts: dict[str, Host],
    clusters: dict[str, Cluster],
    policy_dir: Path,
) -> list[Job]:
    entries: list[Any] = collector.get(table, "job", "", list, [], "[[job]] tables")
    jobs: list[Job] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        path = f"job[{index}]"
        if not isinstance(entry, dict):
            collector.add(path, "expected a [[job]] table")
            continue
        job = _job(entry, path, collector, targets, hosts, clusters, policy_dir)
        if job is None:
            continue
        if job.name in seen:
            collector.add(join_key(path, "name"), f"duplicate job name {job.name!r}")
        seen.add(job.name)
        jobs.append(job)
    _same_domain(jobs, collector)
    return jobs


def _same_domain(jobs: list[Job], collector: Collector) -> None:
    """Two jobs naming the same single domain (on the same host and libvirt) would make
    two histories of it and fight over its checkpoints: a configuration error. (Patterns
    matching one domain are found at run time: that domain alone fails.)"""
    named: dict[tuple[str, str, str], str] = {}
    for job in jobs:
        if job.kind != "libvirt" or not isinstance(job.options.get("domain"), str):
            continue
        key = (job.host, str(job.options.get("uri", "")), job.options["domain"])
        if key in named:
            collector.add(
                f"job[{job.name}].domain",
                f"domain {key[2]!r} is already backed up by job {named[key]!r}: one job per domain",
            )
        named.setdefault(key, job.name)


def _job(
    table: Table,
    path: str,
    collector: Collector,
    targets: dict[str, Target],
    hosts: dict[str, Host],
    clusters: dict[str, Cluster],
    policy_dir: Path,
) -> Job | None:
    name = collector.get(table, "name", path, str, "", "a job name")
    if not NAME_RE.fullmatch(name):
        collector.add(
            join_key(path, "name"),
            f"invalid job name {name!r}: 1-64 letters, "
            "digits, '.', '_', '-', starting with a letter or digit",
        )
    else:
        path = f"job[{name}]"
    kind = collector.get(table, "kind", path, str, "", "a job kind")
    if kind not in KIND_KEYS:
        collector.add(
            join_key(path, "kind"), f"unknown kind {kind!r} (allowed: {', '.join(KIND_KEYS)})"
        )
        return None
    required, optional = KIND_KEYS[kind]
    collector.unknown_keys(table, (*JOB_COMMON_KEYS, *JOB_OPS_KEYS, *required, *optional), path)
    for key in required:
        if key not in table:
            collector.add(join_key(path, key), f"required for kind {kind!r}")
    if kind == "lvm" and "volume" in table:
        _check_lvm(table, path, collector)
    if kind == "libvirt":
        _check_libvirt(table, path, collector)
    host = collector.get(table, "host", path, str, LOCAL_HOST, "a host name")
    if host != LOCAL_HOST and host not in hosts:
        collector.add(
            join_key(path, "host"), f"unknown host {host!r}: add [hosts.{host}] or use 'local'"
        )
    target = _job_target(table, path, collector, targets)
    cluster = _job_cluster(table, path, collector, clusters, targets.get(target))
    if cluster is not None:
        host = cluster.hosts[0]  # until a run finds the host the domain is on
    chosen = targets.get(target)
    mismatched = cluster is not None and chosen is not None and chosen.cluster != cluster.name
    if chosen is not None and not mismatched:  # a cluster job's wrong target: said above
        _check_target_host(chosen, host, kind, table, path, collector, clusters)
        if kind in ON_HOST_KINDS and host != LOCAL_HOST and chosen.host == LOCAL_HOST:
            writer = "the tree is exported" if kind == "files" else "QEMU writes the backup"
            collector.add(
                join_key(path, "target"),
                f"a {kind} job of host {host!r} needs a target that host mounts ({writer} "
                f"there): use a target with host = {host!r}",
            )
    if kind == "libvirt" and host != LOCAL_HOST:
        _check_remote_libvirt(table, path, collector)
    policy = _job_policy(table, path, collector, policy_dir)
    if policy is None:
        return None
    own = (*required, *optional, *JOB_OPS_KEYS, "scratch_dir")
    options = {key: table[key] for key in own if key in table}
    for key in PATH_KEYS:
        if key in options:
            _check_path(options[key], join_key(path, key), collector)
    if options.get("quiesce", "auto") not in ("auto", "required", "off"):
        collector.add(join_key(path, "quiesce"), "must be auto, required or off")
    percent = options.get("thin_pool_max_percent", 80)
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 1 <= percent <= 100:
        collector.add(
            join_key(path, "thin_pool_max_percent"),
            "must be a number from 1 to 100 (the thin pool's data or metadata use above "
            "which gfs drops its delta base snapshot)",
        )
    if not isinstance(options.get("incremental", True), bool):
        collector.add(join_key(path, "incremental"), "must be true or false")
    if options.get("method", "auto") not in ("auto", "backup-api", "push", "snapshot"):
        collector.add(
            join_key(path, "method"),
            "must be auto (backup API, else snapshot), backup-api, push or snapshot",
        )
    limited = targets.get(target)
    if options.get("method") == "push" and limited is not None and limited.bandwidth:
        collector.add(
            join_key(path, "method"),
            f'"push" cannot be rate limited, and target {target} has a bandwidth limit: use '
            'method = "auto" (pull mode, paced by gfs; the snapshot method without '
            "python3-libnbd) or remove the limit",
        )
    disks = options.get("disks", [])
    if not isinstance(disks, list) or not all(isinstance(d, str) and d for d in disks):
        collector.add(join_key(path, "disks"), 'must be a list of disk targets, e.g. ["vda"]')
    return Job(name, kind, host, target, policy, options)


def check_host_uri(uri: str) -> str:
    """The libvirt URI as the host itself names it (qemu:///system): no transport and no
    server, since gfs reaches the host by its own SSH. ValueError saying what to write."""
    parts = urlsplit(uri)
    if "+" in parts.scheme or parts.netloc or not parts.scheme or not parts.path:
        raise ValueError(
            f"uri {uri!r}: with host = ..., name the libvirt as the host itself does "
            '(uri = "qemu:///system", the default): gfs connects to the host by SSH itself'
        )
    return uri


def _check_remote_libvirt(table: Table, path: str, collector: Collector) -> None:
    """A libvirt job on a remote host: libvirt named as that host names it; QEMU there
    writes push-mode backups (backends/libvirt.py), the snapshot method runs here only."""
    uri = table.get("uri", DEFAULT_LIBVIRT_URI)
    try:
        check_host_uri(uri if isinstance(uri, str) else "")
    except ValueError as exc:
        collector.add(join_key(path, "uri"), str(exc))
    if table.get("method") == "snapshot":
        collector.add(
            join_key(path, "method"),
            '"snapshot" runs on this machine only so far: on a remote host gfs uses the '
            'backup API (method = "auto")',
        )


def _check_libvirt(table: Table, path: str, collector: Collector) -> None:
    """One of `domain` (one domain) and `domains` (patterns); the selection keys."""
    if "domain" not in table and "domains" not in table:
        collector.add(
            join_key(path, "domain"),
            "required for kind 'libvirt': one domain (domain = \"web01\"), or patterns "
            '(domains = ["*"]: every domain, present and future)',
        )
    if "domain" in table and "domains" in table:
        collector.add(
            join_key(path, "domains"),
            'name one domain (domain = "web01") or patterns (domains = ["*"]), not both',
        )
    if "domain" in table and (not isinstance(table["domain"], str) or not table["domain"]):
        collector.add(join_key(path, "domain"), "must be a domain name")
    for key in ("domains", "exclude", "exclude_disks"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            collector.add(join_key(path, key), 'must be a list of glob patterns, e.g. ["web*"]')
    if "domains" in table and isinstance(table["domains"], list) and not table["domains"]:
        collector.add(join_key(path, "domains"), 'is empty: ["*"] selects every domain')
    for key in ("exclude", "include_restored"):
        if key in table and "domains" not in table:
            collector.add(join_key(path, key), "needs domains = [...] patterns")
    if "include_restored" in table and not isinstance(table["include_restored"], bool):
        collector.add(join_key(path, "include_restored"), "must be true or false")
    parallel = table.get("max_parallel", 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= 64:
        collector.add(join_key(path, "max_parallel"), "must be a whole number from 1 to 64")
    if "disks" in table and "domains" in table:
        collector.add(join_key(path, "disks"), "names disks of one domain: use exclude_disks")


def _set_every(
    job: Job,
    key: str,
    defaults: Table,
    default: str,
    collector: Collector,
    off_means: str,
) -> None:
    """options[key]: a duration in seconds (the job's own, else the [table] default), 0 =
    "off"."""
    own = key in job.options
    value = job.options.get(key, defaults.get(key, default))
    table = "files" if key == "rehash_every" else "incremental"
    where = f"job[{job.name}].{key}" if own else f"{table}.{key}"
    try:
        job.options[key] = duration_or_off(value, 3600)
    except ValueError as exc:
        collector.add(where, f'{exc} (e.g. "{default}", or "off" {off_means})')


def duration_or_off(value: object, minimum: int) -> int:
    """Seconds of a duration like "30d" (at least `minimum`), 0 for "off" or "never";
    ValueError saying what is wrong."""
    if value in ("off", "never"):
        return 0
    seconds = parse_duration(value)
    if seconds < minimum:
        least = f"{minimum // 3600}h" if minimum % 3600 == 0 else f"{minimum // 60}m"
        raise ValueError(f'{seconds} s is too short: at least {least}, or "off"')
    return seconds


def _job_cluster(
    table: Table,
    path: str,
    collector: Collector,
    clusters: dict[str, Cluster],
    target: Target | None,
) -> Cluster | None:
    """A libvirt job's `cluster`: one domain, on whichever host of the cluster it is, into
    a target every host of that cluster mounts. None when not set or wrong (reported)."""
    name = table.get("cluster")
    if name is None:
        return None
    key = join_key(path, "cluster")
    if "host" in table:
        collector.add(key, "name a cluster or a host, not both")
    if "domains" in table:
        collector.add(key, 'backs up one domain (domain = "web01") so far, not patterns')
    cluster = clusters.get(name) if isinstance(name, str) else None
    if cluster is None:
        collector.add(key, f"unknown cluster {name!r}: add [cluster.{name}] hosts = [...]")
        return None
    if target is not None and target.cluster != cluster.name:
        collector.add(
            join_key(path, "target"),
            f"target {target.name} is not mounted by the hosts of cluster {cluster.name}: use "
            f'a target with cluster = "{cluster.name}" (the share every host mounts)',
        )
    return cluster if cluster.hosts else None


def _check_target_host(
    target: Target,
    host: str,
    kind: str,
    table: Table,
    path: str,
    collector: Collector,
    clusters: dict[str, Cluster],
) -> None:
    """A target mounted by a remote host takes data only from jobs on that host (the data
    would need a third path otherwise), and so far only raw LVM images. A cluster's target
    takes data from jobs on any of its hosts."""
    if target.host == LOCAL_HOST:
        return
    key = join_key(path, "target")
    members = clusters[target.cluster].hosts if target.cluster in clusters else ()
    if target.cluster is not None and host not in members:
        collector.add(
            key,
            f"target {target.name} is the share of cluster {target.cluster}: a job writing "
            f"to it runs on one of its hosts ({', '.join(members)}), not on {host!r}",
        )
    elif target.cluster is None and host != target.host:
        collector.add(
            key,
            f"target {target.name} is mounted on host {target.host!r} but the job runs on "
            f"{host!r}: set host = {target.host!r} or use a target mounted there",
        )
    elif kind == "lvm" and table.get("format", "raw") != "raw":
        collector.add(
            key,
            f"target {target.name} is on host {target.host!r}: lvm jobs export to a remote "
            'target with format "raw" only so far',
        )


def _check_lvm(options: Table, path: str, collector: Collector) -> None:
    volume = options.get("volume")
    try:
        split_volume(volume if isinstance(volume, str) else "")
    except LvmInputError as exc:
        collector.add(join_key(path, "volume"), str(exc))
    if options.get("format", "raw") not in ("raw", "qcow2"):
        collector.add(join_key(path, "format"), "must be raw or qcow2")
    size = options.get("snapshot_size", "20%")
    try:
        parse_size(size if isinstance(size, str) else "", 1 << 30)
    except LvmInputError as exc:
        collector.add(join_key(path, "snapshot_size"), str(exc))


def _check_path(value: object, key: str, collector: Collector) -> None:
    """Source paths: absolute, no `..` (what is backed up must be plain to see)."""
    if not isinstance(value, str):
        collector.add(key, f"expected an absolute path, got {type(value).__name__}")
    elif not value.startswith("/") or ".." in value.split("/") or "\0" in value:
        collector.add(key, f"{value!r} must be an absolute path without '..'")


def _job_target(table: Table, path: str, collector: Collector, targets: dict[str, Target]) -> str:
    if "target" not in table and len(targets) == 1:
        return next(iter(targets))
    target = collector.get(table, "target", path, str, "", "a target name")
    if target not in targets:
        known = ", ".join(targets) or "none defined"
        collector.add(join_key(path, "target"), f"unknown target {target!r} (targets: {known})")
    return target


def _job_policy(
    table: Table,
    path: str,
    collector: Collector,
    policy_dir: Path,
) -> Policy | None:
    value = table.get("policy")
    key = join_key(path, "policy")
    if isinstance(value, dict):
        return policy_from_table(value, f"{path}.policy", collector, key)
    if not isinstance(value, str):
        collector.add(key, "required: a policy name (e.g. classic-gfs) or an inline table")
        return None
    try:
        return load_policy_file(find_policy(value, (policy_dir,)), value)
    except InputError as exc:
        collector.extend(
            problem if problem.where else Problem(f"{collector.source}: {key}", problem.message)
            for problem in exc.problems
        )
        return None
