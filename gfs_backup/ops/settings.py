"""The operations settings of gfs.toml, validated with the rest of the config:

    ping_url = "https://hc-ping.com/UUID"       # the whole `gfs run` (start, success, fail)
    [metrics]
    textfile = "/var/lib/prometheus/node-exporter/gfs.prom"   # the default; "off": none
    [notify]                                    # see gfs_backup/ops/notify.py
    [[job]]
    ping_url = "https://hc-ping.com/UUID2"      # this job's own runs
    max_age = "36h"                              # gfs status --check (default: 1.5 x the
    max_verify_age = "8d"                        # longest gap of the policy's schedule,
    max_drill_age = "40d"                        # its [verify] / [drill] schedule); "off"
    hooks = { before = ["/usr/local/bin/db-flush"], after = ["/usr/local/bin/db-unlock"] }

Registered with `core.config.register_section` when this module is imported (the run and
check commands import it), so `gfs check` reports these keys' problems with the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfs_backup.core.config import Config, Job, duration_or_off, register_section
from gfs_backup.core.validate import Collector, Table, join_key
from gfs_backup.ops.hooks import Hooks, parse_hooks
from gfs_backup.ops.notify import NotifySettings, parse_notify
from gfs_backup.ops.pings import check_ping_url

SECTION = "ops"
DEFAULT_TEXTFILE = Path("/var/lib/prometheus/node-exporter/gfs.prom")
METRICS_KEYS = ("textfile",)
AGE_KEYS = ("max_age", "max_verify_age", "max_drill_age")


@dataclass(frozen=True)
class JobOps:
    hooks: Hooks = field(default_factory=Hooks)
    ping_url: str | None = None


@dataclass(frozen=True)
class OpsSettings:
    textfile: Path | None = DEFAULT_TEXTFILE  # None: no metrics file
    textfile_explicit: bool = False  # set in the config (a missing directory is an error)
    notify: NotifySettings | None = None
    ping_url: str | None = None
    jobs: dict[str, JobOps] = field(default_factory=dict)

    def job(self, name: str) -> JobOps:
        return self.jobs.get(name, JobOps())


def parse_ops(table: Table, collector: Collector, jobs: list[Job]) -> OpsSettings:
    metrics = collector.get(table, "metrics", "", dict, {}, "a [metrics] table")
    collector.unknown_keys(metrics, METRICS_KEYS, "metrics")
    textfile: Path | None = DEFAULT_TEXTFILE
    explicit = "textfile" in metrics
    value = collector.get(metrics, "textfile", "metrics", str, str(DEFAULT_TEXTFILE), "a path")
    if value in ("off", "none"):
        textfile = None
    elif not value.startswith("/") or value.endswith("/"):
        collector.add(
            "metrics.textfile",
            f"{value!r} must be an absolute file path (node_exporter's textfile directory "
            'and a name ending in .prom), or "off"',
        )
    else:
        textfile = Path(value)
        if textfile.suffix != ".prom":
            collector.add("metrics.textfile", f"{value!r}: node_exporter reads only *.prom files")
    notify_table = collector.get(table, "notify", "", dict, None, "a [notify] table")
    notify = parse_notify(notify_table, collector)
    ping_url = (
        check_ping_url(table["ping_url"], "ping_url", collector) if "ping_url" in table else None
    )
    per_job: dict[str, JobOps] = {}
    for job in jobs:
        where = f"job[{job.name}]"
        hooks = parse_hooks(job.options.get("hooks"), join_key(where, "hooks"), collector)
        url = job.options.get("ping_url")
        job_url = (
            check_ping_url(url, join_key(where, "ping_url"), collector) if url is not None else None
        )
        for key in AGE_KEYS:
            if key in job.options:
                job.options[key] = _age(job.options[key], join_key(where, key), collector)
        per_job[job.name] = JobOps(hooks, job_url)
    return OpsSettings(textfile, explicit, notify, ping_url, per_job)


def _age(value: object, key: str, collector: Collector) -> float:
    """Seconds (0: "off", not judged)."""
    try:
        return float(duration_or_off(value, 60))
    except ValueError as exc:
        collector.add(key, f'{exc} (e.g. "36h", "8d", or "off" not to judge it)')
        return 0.0


def ops_warnings(config: Config) -> list[str]:
    """What `gfs check` says about the operations settings: channels that cannot work as
    configured on this machine (a notification that would fail the night it is needed)."""
    ops = ops_of(config)
    warnings = []
    if ops.textfile is not None and ops.textfile_explicit and not ops.textfile.parent.is_dir():
        warnings.append(
            f"metrics: directory {ops.textfile.parent} does not exist: no metrics are written "
            "(install prometheus-node-exporter, or set [metrics] textfile)"
        )
    email = ops.notify.email if ops.notify is not None else None
    if email is not None and email.smtp_host is None and not os.access(email.sendmail, os.X_OK):
        warnings.append(
            f"notify: {email.sendmail} is not an executable: no email can be sent (install "
            'an MTA, e.g. apt install dma, or set [notify.email] smtp = "host:587")'
        )
    if email is not None and email.password_file and not os.access(email.password_file, os.R_OK):
        warnings.append(f"notify: password_file {email.password_file} cannot be read")
    for job in config.jobs:
        for phase in ops.job(job.name).hooks.phases:
            program = ops.job(job.name).hooks.command(phase)[0]
            if not os.access(program, os.X_OK):
                warnings.append(f"job {job.name}: hook {phase}: {program} is not an executable")
    return warnings


def ops_of(config: Config) -> OpsSettings:
    """The operations settings of a loaded config (defaults for one built in code)."""
    found: Any = config.sections.get(SECTION)
    return found if isinstance(found, OpsSettings) else OpsSettings()


register_section(SECTION, parse_ops)
