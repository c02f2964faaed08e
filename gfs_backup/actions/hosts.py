"""`gfs hosts`: the configured remote hosts, trusting their SSH host keys, checking them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gfs_backup.core.config import DEFAULT_LIBVIRT_URI, Config, Host
from gfs_backup.core.errors import GfsError, InputError, Problem
from gfs_backup.tools.virt import Connection
from gfs_backup.transport.known_hosts import (
    HostKey,
    HostKeyError,
    Verdict,
    check_host_key,
    known_hosts_path,
    lookup_name,
    read_known_hosts,
    record_host_key,
    recorded_keys,
)
from gfs_backup.transport.runner import Command
from gfs_backup.transport.ssh import CONNECT_TIMEOUT, SSHRunner, fetch_host_key
from gfs_backup.transport.virttunnel import tunnel_for


@dataclass(frozen=True)
class HostInfo:
    host: Host
    known_hosts: Path
    keys: list[HostKey]  # recorded for the host: empty means unknown


@dataclass(frozen=True)
class Trusted:
    host: Host
    key: HostKey
    known_hosts: Path
    outcome: str  # recorded | replaced | already trusted


@dataclass(frozen=True)
class HostCheck:
    host: Host
    ok: bool
    message: str


def select_hosts(config: Config, names: Iterable[str]) -> list[Host]:
    """The named hosts (all when none named). Raises InputError for unknown names."""
    wanted = list(names)
    if not wanted:
        return list(config.hosts.values())
    unknown = [name for name in wanted if name not in config.hosts]
    if unknown:
        known = ", ".join(config.hosts) or "none: add [hosts.NAME] tables"
        raise InputError(
            [Problem(config.source, f"no host named {name!r} (hosts: {known})") for name in unknown]
        )
    return [config.hosts[name] for name in wanted]


def host_infos(config: Config) -> list[HostInfo]:
    """Each configured host with the keys its known_hosts file records for it."""
    infos = []
    for host in config.hosts.values():
        path = known_hosts_path(host)
        keys = recorded_keys(read_known_hosts(path), lookup_name(host.address, host.port))
        infos.append(HostInfo(host, path, keys))
    return infos


def trust_host(host: Host, replace: bool, expect: str | None = None) -> Trusted:
    """Fetch the host's key and record it in its known_hosts file.

    With `expect` (a `SHA256:...` fingerprint read on the host), a key with another
    fingerprint is refused. A different key already recorded for the host is replaced
    only with `replace`. A key marked @revoked is never recorded. Refusals: HostKeyError.
    """
    key = fetch_host_key(host)
    if expect is not None and expect.removeprefix("SHA256:") != key.fingerprint[7:]:
        raise HostKeyError(
            f"host {host.name} ({host.address}:{host.port}) sent {key}, not the expected "
            f"{expect}: not recorded; check the address and the fingerprint on the host"
        )
    path = known_hosts_path(host)
    name = lookup_name(host.address, host.port)
    entries = read_known_hosts(path)
    verdict, _ = check_host_key(entries, name, key)
    if verdict is Verdict.KNOWN:
        return Trusted(host, key, path, "already trusted")
    if verdict is Verdict.REVOKED:
        raise HostKeyError(
            f"host {host.name} ({host.address}:{host.port}) sent {key}, which {path} marks "
            "@revoked: not recorded"
        )
    recorded = recorded_keys(entries, name)
    if recorded and not replace:
        raise HostKeyError(
            f"host {host.name} ({host.address}:{host.port}) sent {key}, but {path} records "
            f"a different key for {name} ({', '.join(str(k) for k in recorded)}): check the "
            f"new fingerprint on the host, then run `gfs hosts trust {host.name} --replace`"
        )
    record_host_key(path, name, key, replace=bool(recorded))
    return Trusted(host, key, path, "replaced" if recorded else "recorded")


def libvirt_uris(config: Config, host: str) -> list[str]:
    """The libvirt URIs gfs uses on `host`: of its libvirt jobs, and of the cluster jobs
    whose cluster it is in."""
    uris = set()
    for job in config.jobs:
        cluster = job.options.get("cluster")
        hosts = config.clusters[str(cluster)].hosts if cluster else (job.host,)
        if job.kind == "libvirt" and host in hosts:
            uris.add(str(job.options.get("uri", DEFAULT_LIBVIRT_URI)))
    return sorted(uris)


def check_hosts(config: Config, hosts: list[Host]) -> list[HostCheck]:
    """Connect to each host and run `true` there, and where libvirt jobs run on it, open
    its libvirt through gfs's tunnel; one result per host."""
    results = []
    for host in hosts:
        runner = SSHRunner(host)
        try:
            runner.run(Command(("true",), timeout=CONNECT_TIMEOUT))
            found = [_libvirt_version(runner, uri) for uri in libvirt_uris(config, host.name)]
            results.append(HostCheck(host, True, "; ".join(["ok", *found])))
        except GfsError as exc:
            results.append(HostCheck(host, False, str(exc)))
        finally:
            runner.close()
    return results


def _libvirt_version(runner: SSHRunner, uri: str) -> str:
    """`uri` on the runner's host answers through the tunnel: its libvirt version."""
    connection = Connection(f"{uri} on host {runner.host}", tunnel_for(runner, uri).uri)
    try:
        version = int(connection.conn.getLibVersion())
    finally:
        connection.close()
    major, minor, micro = version // 1_000_000, version // 1000 % 1000, version % 1000
    return f"libvirt {major}.{minor}.{micro} at {uri}"
