"""`gfs init`: write a first, commented configuration for this KVM host."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from gfs_backup.actions.init import (
    PLACEHOLDER_PATH,
    TARGET_NAME,
    check_target_path,
    discover,
    render_config,
    write_new_file,
)
from gfs_backup.cli.complete import complete_domains
from gfs_backup.tools.virt import DEFAULT_URI


@click.command("init")
@click.option(
    "--output",
    "-o",
    "output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the configuration to this new file (never overwritten) instead of stdout.",
)
@click.option(
    "--target-path",
    metavar="PATH",
    default=None,
    help="The target's path (an NFS mount point); default: the first NFS mount found.",
)
@click.option(
    "--exclude",
    "exclude",
    metavar="PATTERN",
    multiple=True,
    shell_complete=complete_domains,
    help="Leave these domains out (a name or glob pattern; repeatable).",
)
@click.option(
    "--uri",
    default=DEFAULT_URI,
    show_default=True,
    help="The libvirt whose domains are backed up.",
)
def init_command(
    output: Path | None, target_path: str | None, exclude: tuple[str, ...], uri: str
) -> None:
    """Write a first configuration for this KVM host: one target, one job for all VMs.

    \b
    gfs init looks at this host and writes a commented TOML configuration:
    - [target.nas] on the first NFS mount (/proc/self/mountinfo), or on
      --target-path; without any NFS mount, a path marked EDIT that
      `gfs check` reports until the share is mounted there;
    - one libvirt job "vms" of every domain, present and future
      (domains = ["*"], exclude = [...]), on the shipped classic-gfs policy,
      with the domains found listed in comments, and how one opts out;
    - how to start the systemd timer.
    When libvirt is missing or libvirtd does not answer, the configuration is
    written all the same, saying so (in a comment and on stderr).

    \b
    Examples:
      gfs init > /etc/gfs/gfs.toml && gfs check && gfs run --dry-run
      gfs init --output /etc/gfs/gfs.toml --target-path /mnt/nas
      gfs init --exclude 'test-*' --exclude scratch01 | less
    """
    path = None if target_path is None else check_target_path(target_path)
    found = discover(uri, datetime.now().astimezone())
    text = render_config(found, path, list(exclude))
    if output is None:
        click.echo(text, nl=False)
    else:
        write_new_file(output, text)
    if found.libvirt_problem is not None:
        click.echo(
            f"gfs: warning: {found.libvirt_problem}: no domain listed in the configuration "
            "(the job backs up every domain once libvirt answers)",
            err=True,
        )
    if path is None and not found.nfs:
        click.echo(
            f"gfs: warning: no NFS mount found: edit [target.{TARGET_NAME}] path "
            f"({PLACEHOLDER_PATH}, marked EDIT), or run gfs init --target-path PATH",
            err=True,
        )
    if output is not None:
        click.echo(f"gfs: wrote {output}; next: gfs check --config {output}", err=True)
