"""`gfs check`: lint the configuration and every policy it uses."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gfs_backup.cli.options import config_option, json_option
from gfs_backup.cli.render import describe_rules
from gfs_backup.config import load_config


@click.command("check")
@config_option
@json_option
def check_command(config_path: Path, as_json: bool) -> None:
    """Validate the configuration and the policies its jobs use.

    Every problem is reported at once, one line each, with the file and the dotted key
    path (e.g. `job[web01].policy.retention.sons`). Exits 3 when anything is invalid.
    """
    config = load_config(config_path)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "config": config.source,
                    "jobs": [
                        {
                            "name": job.name,
                            "kind": job.kind,
                            "host": job.host,
                            "target": job.target,
                            "policy": job.policy.name,
                        }
                        for job in config.jobs
                    ],
                    "problems": [],
                },
                indent=2,
            )
        )
        return
    click.echo(
        f"{config.source}: valid, {len(config.jobs)} job(s), {len(config.targets)} target(s)"
    )
    for job in config.jobs:
        click.echo(
            f"  {job.name}: {job.kind} on {job.host} -> {job.target}, policy "
            f"{job.policy.name} ({describe_rules(job.policy.rules)})"
        )
