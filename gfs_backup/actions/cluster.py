"""Cluster jobs: one libvirt domain backed up on whichever host of a cluster it is on.

A `[cluster.NAME] hosts = [...]` is KVM hosts sharing storage and a backup share (a target
with `cluster = NAME`, mounted at the same path by every host); their domains move between
them (live migration, or undefined on one and defined on another). Each run of a job with
`cluster = NAME` asks the libvirt of every host (through gfs's SSH connection to each,
transport/virttunnel.py) where the domain is:

- running on exactly one host: backed up there;
- running nowhere: backed up where it is defined, if that is one host;
- running on two hosts (a split brain, or a migration caught half way), defined shut off on
  two hosts, on none, or not running on any host that answered while another did not: an
  error naming the hosts (gfs cannot tell which copy is the domain; backing up a stale
  definition would look like a backup and not be one).

The job's generations stay in one directory whatever host made them (the manifest records
the host), so the history goes on across migrations. Before a generation is published the
domain is located again: if it moved, was started (a shut-off copy) or stopped meanwhile,
the run fails and publishes nothing; the next run backs it up where it is then.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from gfs_backup.backends.libvirt import connect
from gfs_backup.core.config import Config, Job
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.transport.ssh import runner_for

log = logging.getLogger("gfs.cluster")


class NotLocated(GfsError):
    """The domain is on no host, or on more than one, or a host that did not answer."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class Seen:
    """The domain as one host's libvirt shows it (`error`: that host did not answer)."""

    host: str
    defined: bool = False
    running: bool = False
    uuid: str = ""
    error: str = ""


@dataclass(frozen=True)
class Located:
    host: str
    running: bool
    uuid: str


def _look(config: Config, job: Job, host: str) -> Seen:
    try:
        connection = connect(replace(job, host=host), runner_for(host, config))
    except GfsError as exc:
        return Seen(host, error=str(exc))
    try:
        domain = connection.find(str(job.options["domain"]))
        if domain is None:
            return Seen(host)
        return Seen(host, True, connection.is_running(domain), domain.UUIDString())
    except GfsError as exc:
        return Seen(host, error=str(exc))
    finally:
        connection.close()


def locate(config: Config, job: Job) -> Located:
    """Where the cluster job's domain is now (see the module's doc); NotLocated naming the
    hosts otherwise. Every host is asked at once."""
    cluster = config.clusters[str(job.options["cluster"])]
    name = str(job.options["domain"])
    with ThreadPoolExecutor(len(cluster.hosts), thread_name_prefix="gfs-locate") as pool:
        seen = list(pool.map(lambda host: _look(config, job, host), cluster.hosts))
    running = [s for s in seen if s.running]
    defined = [s for s in seen if s.defined]
    silent = [s for s in seen if s.error]
    for one in silent:
        log.warning("job %s: host %s: %s", job.title, one.host, one.error)
    if len(running) > 1:
        raise NotLocated(
            f"job {job.title}: domain {name} is running on hosts "
            f"{' and '.join(s.host for s in running)} at once: gfs cannot tell which is the "
            "domain; stop the stale copy (a half-finished migration?), then run again"
        )
    if running:
        return Located(running[0].host, True, running[0].uuid)
    hosts = ", ".join(cluster.hosts)
    if silent:
        raise NotLocated(
            f"job {job.title}: domain {name} is not running on any host of cluster "
            f"{cluster.name} that answered, and host(s) {', '.join(s.host for s in silent)} "
            "did not answer: it may run there; no backup of a copy that may be stale"
        )
    if len(defined) > 1:
        raise NotLocated(
            f"job {job.title}: domain {name} is shut off and defined on hosts "
            f"{' and '.join(s.host for s in defined)}: gfs cannot tell which definition is "
            "current; undefine it on all but one (virsh undefine), then run again"
        )
    if not defined:
        raise NotLocated(
            f"job {job.title}: domain {name} is on none of the hosts of cluster "
            f"{cluster.name} ({hosts}): virsh list --all on each shows their domains"
        )
    return Located(defined[0].host, False, defined[0].uuid)


def on_its_host(config: Config, job: Job) -> tuple[Job, Located | None]:
    """The job as it runs now: a cluster job on the host its domain is on (NotLocated when
    that cannot be told), any other job as it is."""
    if not job.options.get("cluster"):
        return job, None
    found = locate(config, job)
    log.info(
        "job %s: domain %s is %s on host %s",
        job.title,
        job.options["domain"],
        "running" if found.running else "shut off",
        found.host,
    )
    return replace(job, host=found.host), found


def explain_failure_in_cluster(config: Config, job: Job, failure: GfsError) -> None:
    """A cluster job's export failed: if the domain is now running on another host (it was
    migrated), raise a GfsError saying so, else return (the failure speaks for itself)."""
    try:
        now = locate(config, job)
    except NotLocated:
        return
    if now.host != job.host and now.running:
        raise GfsError(
            f"job {job.title}: domain {job.options['domain']} moved from host {job.host} to "
            f"{now.host} during its backup ({failure}): no generation was made; the next "
            "run backs it up there"
        ) from None


def check_unmoved(config: Config, job: Job, before: Located) -> None:
    """Before a cluster job publishes: the domain is still where, and as, it was backed up.
    GfsError saying what changed (nothing is published; the next run backs it up)."""
    try:
        now = locate(config, job)
    except NotLocated as exc:
        raise GfsError(f"{exc} (after its backup: nothing was published)") from None
    if (now.host, now.running, now.uuid) == (before.host, before.running, before.uuid):
        return
    if now.host != before.host:
        what = f"moved from host {before.host} to {now.host}"
    elif now.uuid != before.uuid:
        what = f"was redefined on host {now.host} (another UUID)"
    else:
        what = "was started" if now.running else "was shut off"
    raise GfsError(
        f"job {job.title}: domain {job.options['domain']} {what} during its backup: no "
        "generation was made; the next run backs it up where it is then"
    )
