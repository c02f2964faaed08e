"""Where a job's generations live: the target's directory and the filesystem that holds it
(this machine, or the remote host that mounts the target)."""

from __future__ import annotations

import logging
from pathlib import Path

from gfs_backup.core.config import LOCAL_HOST, Config, Job
from gfs_backup.target.fs import LOCAL_FS, RemoteFS, TargetFS
from gfs_backup.transport.ssh import SSHRunner, runner_for

log = logging.getLogger("gfs.targets")


def target_fs(
    config: Config, target_name: str, dry_run: bool = False, host: str | None = None
) -> TargetFS:
    """LOCAL_FS for a target mounted here, else a RemoteFS through its host's runner (the
    SSH connection the host's jobs share); a cluster's share through the first of its hosts
    that answers, `host` first (the host a cluster job runs on)."""
    target = config.targets[target_name]
    if target.host == LOCAL_HOST:
        return LOCAL_FS
    through = target.host
    if target.cluster is not None:
        first = host if host not in (None, LOCAL_HOST) else None
        through = answering_host(config, target.cluster, first, dry_run)
    runner = runner_for(through, config, dry_run)
    return RemoteFS(runner, target.name, target.path, target.io_timeout)


def answering_host(
    config: Config, cluster_name: str, first: str | None = None, dry_run: bool = False
) -> str:
    """The first host of the cluster (`first` before the others) whose SSH connection opens;
    the last one tried when none does (its commands then fail, naming it)."""
    hosts = list(config.clusters[cluster_name].hosts)
    if first in hosts:
        hosts.remove(first)
        hosts.insert(0, first)
    for name in hosts:
        runner = runner_for(name, config, dry_run)
        if not isinstance(runner, SSHRunner) or runner.reachable():
            if name != hosts[0]:
                log.warning(
                    "cluster %s: host %s does not answer: through host %s",
                    cluster_name,
                    hosts[0],
                    name,
                )
            return name
    return hosts[-1]


def job_dir(config: Config, job: Job) -> Path:
    """`<target>/<job>`, as the target's host sees it; a domain of a pattern job:
    `<target>/<job>/<name>--<UUID>` (see gfs_backup/actions/members.py)."""
    folder = config.targets[job.target].path / job.family
    history = job.options.get("history") if job.parent is not None else None
    return folder / str(history) if history else folder


def job_location(config: Config, job: Job, dry_run: bool = False) -> tuple[Path, TargetFS]:
    """The job's directory on its target and the filesystem that holds it."""
    return job_dir(config, job), target_fs(config, job.target, dry_run, job.host)
