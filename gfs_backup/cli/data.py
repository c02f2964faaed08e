"""`gfs verify`, `gfs restore`, `gfs protect`, `gfs unprotect`, `gfs forget`."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from gfs_backup.actions.members import forget
from gfs_backup.actions.plan import select_jobs, select_one
from gfs_backup.actions.restore import (
    restore,
    restore_over_original,
    set_protected,
    verify_jobs,
)
from gfs_backup.actions.targets import job_location
from gfs_backup.backends.base import RestoreOptions
from gfs_backup.cli.complete import (
    complete_generations,
    complete_gone_domains,
    complete_job,
    complete_jobs,
)
from gfs_backup.cli.options import config_option, json_option
from gfs_backup.cli.progress import progress_for
from gfs_backup.core.config import load_config
from gfs_backup.core.errors import ExitCode, InputError, Problem
from gfs_backup.core.state import State
from gfs_backup.target.catalog import list_generations

generation_option = click.option(
    "--generation",
    "generation",
    metavar="ID",
    shell_complete=complete_generations,
    default=None,
    help="A generation id (see `gfs list`); default: the newest.",
)


@click.command("verify")
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
@config_option
@click.option(
    "--generation",
    "generation",
    metavar="ID",
    shell_complete=complete_generations,
    default=None,
    help="Verify only this generation (default: every generation).",
)
@json_option
def verify_command(
    jobs: tuple[str, ...], config_path: Path, generation: str | None, as_json: bool
) -> None:
    """Re-read generations and check every checksum; record the result in each manifest.

    Exits 5 when any generation is damaged.
    """
    config = load_config(config_path)
    results = verify_jobs(config, select_jobs(config, jobs), generation, datetime.now(timezone.utc))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "generations": [
                        {
                            "job": r.stored.manifest.job,
                            "id": r.stored.id,
                            "ok": r.ok,
                            "problems": r.problems,
                        }
                        for r in results
                    ]
                },
                indent=2,
            )
        )
    else:
        for result in results:
            verdict = "ok" if result.ok else "FAILED"
            click.echo(f"{result.stored.manifest.job} {result.stored.id}: {verdict}")
            for problem in result.problems:
                click.echo(f"  {problem}")
    if any(not result.ok for result in results):
        raise SystemExit(int(ExitCode.FAILED))


@click.command("restore")
@click.argument("job", shell_complete=complete_job)
@config_option
@generation_option
@click.option(
    "--as-domain",
    "domain_name",
    metavar="NAME",
    default=None,
    help="libvirt: the new domain's name (default: <domain>-restored-<generation>).",
)
@click.option(
    "--keep-interfaces",
    is_flag=True,
    help="libvirt: keep the network interfaces (default: removed, so the copy stays offline).",
)
@click.option(
    "--to",
    "to",
    default=None,
    type=click.Path(path_type=Path),
    help="Where to restore: a new directory (files, libvirt disks), subvolume path (btrfs) "
    "or image file (lvm).",
)
@click.option(
    "--over-original",
    is_flag=True,
    help="libvirt: write the disks over the disks of the job's own domain, which must be "
    "shut off (instead of --to).",
)
def restore_command(
    job: str,
    config_path: Path,
    generation: str | None,
    domain_name: str | None,
    keep_interfaces: bool,
    to: Path | None,
    over_original: bool,
) -> None:
    """Restore a generation of JOB to a new path, checked against its manifest.

    \b
    btrfs jobs:   `btrfs receive` of the stored stream, made a writable subvolume at --to
                  (on a btrfs filesystem).
    files jobs:   the file tree with owners, modes, times, symlinks, hard links, xattrs
                  (ACLs, capabilities), fifos and device nodes, the root directory's own
                  metadata; every file checked against its checksum.
    libvirt jobs: the disks copied into the new directory --to, checked with qemu-img
                  check, and a new domain defined on them (new name and UUID, network
                  interfaces removed unless --keep-interfaces, then with new MACs); it is
                  not started. Its logs, sockets, NVRAM and display ports are its own (in
                  --to or chosen by libvirt), so it can start beside the running original.
                  With --over-original instead: the disks of the job's shut-off domain
                  are replaced (files: written beside and renamed over the old ones only
                  when complete and compared; block devices: written onto the device).
    lvm jobs:     the raw image written to the new file --to.

    With --to, the restore is written to `.gfs-restore-NAME-rRUN` beside it and renamed
    to --to only when complete and checked: a failed restore leaves nothing at --to.
    btrfs, files and libvirt jobs of a remote host (`host =` in the job) restore on that
    host: --to is a path there, and a libvirt job's new domain is defined in its libvirt;
    --over-original writes there too. A cluster job (`cluster =`) restores --to on the
    first host of the cluster that answers, --over-original on the host its domain is
    defined on.
    """
    if over_original == (to is not None):
        raise click.UsageError("give exactly one of --to PATH and --over-original")
    if over_original and (domain_name or keep_interfaces):
        raise click.UsageError(
            "--as-domain and --keep-interfaces go with --to, not --over-original"
        )
    config = load_config(config_path)
    selected = select_one(config, job)
    progress = progress_for(f"{job}: restore")
    if to is None:
        stored = restore_over_original(
            config, selected, generation, datetime.now(timezone.utc), progress
        )
        click.echo(f"{job}: restored generation {stored.id} over the disks of its domain")
        return
    options = RestoreOptions(domain_name, keep_interfaces)
    stored = restore(
        config, selected, generation, to, datetime.now(timezone.utc), progress, options
    )
    click.echo(f"{job}: restored generation {stored.id} to {to}")


def _protect(job: str, generation: str, config_path: Path, protected: bool) -> None:
    config = load_config(config_path)
    selected = select_one(config, job)
    stored = set_protected(config, selected, generation, protected)
    state = "protected: never pruned" if protected else "no longer protected"
    click.echo(f"{job} {stored.id}: {state}")


@click.command("protect")
@click.argument("job", shell_complete=complete_job)
@click.argument("generation", shell_complete=complete_generations)
@config_option
def protect_command(job: str, generation: str, config_path: Path) -> None:
    """Protect a generation: always kept, never pruned, never counted by the rotation."""
    _protect(job, generation, config_path, True)


@click.command("unprotect")
@click.argument("job", shell_complete=complete_job)
@click.argument("generation", shell_complete=complete_generations)
@config_option
def unprotect_command(job: str, generation: str, config_path: Path) -> None:
    """Remove the protection of a generation; the rotation decides about it again."""
    _protect(job, generation, config_path, False)


@click.command("forget")
@click.argument("job", shell_complete=complete_job)
@click.argument("domain", shell_complete=complete_gone_domains)
@config_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts, no terminal).")
@click.option("--wait", is_flag=True, help="Wait for a run holding the domain's lock.")
def forget_command(job: str, domain: str, config_path: Path, yes: bool, wait: bool) -> None:
    """Delete every generation of a domain that is gone from a `domains` job.

    \b
    A domain that disappears (undefined, moved away) keeps its generations: runs no
    longer prune them, and retention never deletes them. When they are no longer needed:
      gfs forget vms web01          # by the name it had, or by its UUID
    It asks first (--yes does not), and refuses while the domain still exists.
    """
    config = load_config(config_path)
    parent = select_jobs(config, [job], members=False)[0]
    if not parent.selects_domains:
        raise InputError([Problem(config.source, f"job {job} backs up one domain: use gfs prune")])
    member_job = select_one(config, f"{job}/{domain}")
    count = len(list_generations(*job_location(config, member_job)).stored)
    question = (
        f"Delete all {count} generation(s) of domain {member_job.options['domain']} "
        f"(UUID {member_job.options['uuid']}) of job {job}?"
    )
    if not yes:
        if not sys.stdin.isatty():
            raise InputError([Problem(config.source, f"{question} Pass --yes to confirm.")])
        click.confirm(question, abort=True)
    state = State(config.state_dir)
    try:
        deleted = forget(config, parent, member_job, state, wait)
    finally:
        state.close()
    click.echo(f"{member_job.title}: deleted {len(deleted)} generation(s) and the history")
