"""Shell completion (click's own: `_GFS_COMPLETE=bash_source gfs`, zsh_source, fish_source;
scripts/install installs the three scripts) of job names, `JOB/DOMAIN`, generation ids and
domain names.

The callbacks read what the command line typed so far (its --config, its job), ask
gfs_backup.actions.completion, and offer what starts with the word being completed. They
never fail and never take much more than a second (see that module).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import click

from gfs_backup.actions.completion import (
    domain_names,
    generation_ids,
    gone_domains,
    job_names,
    member_names,
)
from gfs_backup.core.config import DEFAULT_CONFIG


def _config_path(ctx: click.Context) -> Path:
    """The --config typed (or its default: $GFS_CONFIG, /etc/gfs/gfs.toml)."""
    value = ctx.params.get("config_path")
    if value:
        return Path(value)
    return Path(os.environ.get("GFS_CONFIG", str(DEFAULT_CONFIG)))


def _typed_jobs(ctx: click.Context) -> list[str]:
    """The job names already on the command line (`job` or `jobs`). While an option's
    value is completed, click leaves the arguments typed before it unparsed: `ctx.args`."""
    single = ctx.params.get("job")
    several = ctx.params.get("jobs") or ()
    if isinstance(single, str):
        return [single]
    if several:
        return [str(name) for name in several]
    typed = [str(arg) for arg in ctx.args if not str(arg).startswith("-")]
    return typed[:1] if "job" in ctx.params else typed


def _starting(values: Iterable[str], incomplete: str, typed: Iterable[str] = ()) -> list[str]:
    skip = set(typed)
    return [value for value in values if value.startswith(incomplete) and value not in skip]


def _jobs(ctx: click.Context, incomplete: str) -> list[str]:
    """Job names; after `JOB/`, the domains that job's patterns select."""
    config = _config_path(ctx)
    if "/" in incomplete:
        return _starting(member_names(config, incomplete.split("/", 1)[0]), incomplete)
    return _starting(job_names(config), incomplete)


def complete_jobs(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """The configured jobs (or `JOB/DOMAIN`) not yet named on the command line."""
    typed = set(_typed_jobs(ctx))
    return [name for name in _jobs(ctx, incomplete) if name not in typed]


def complete_job(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """The configured jobs, or `JOB/DOMAIN` (an argument naming one job)."""
    return _jobs(ctx, incomplete)


def complete_generations(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """Generation ids of the job(s) typed so far (every job's when none), newest first."""
    return _starting(generation_ids(_config_path(ctx), _typed_jobs(ctx)), incomplete)


def complete_domains(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """The domains of the libvirt typed (--uri), else of the configuration's libvirt jobs."""
    uri = ctx.params.get("uri")
    return _starting(
        domain_names(_config_path(ctx), uri if isinstance(uri, str) else None), incomplete
    )


def complete_gone_domains(
    ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[str]:
    """UUIDs of the domains the typed job backed up and libvirt no longer has."""
    jobs = _typed_jobs(ctx)
    return _starting(gone_domains(_config_path(ctx), jobs[0]) if jobs else [], incomplete)
