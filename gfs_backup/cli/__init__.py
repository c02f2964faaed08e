"""The `gfs` command line. The only layer that imports click or prints.

Expected errors (GfsError) become one line per problem on stderr and a documented exit code;
anything else is a bug: one line, exit 1, and a traceback only with --debug.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from gfs_backup import __version__
from gfs_backup.cli import check, data, drill, hosts, init, inspect, jobs, plan
from gfs_backup.cli.progress import setup_logging
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.transport.ssh import close_runners

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  internal error (a bug: gfs --debug ... shows the traceback)
  2  wrong command-line usage
  3  invalid configuration, policy, timestamps file or option value
  4  some jobs failed, others succeeded
  5  every job failed
  6  a job's lock is held by another run
  7  gfs check: valid, but with warnings
"""


class GfsGroup(click.Group):
    """Turns errors into one-line messages and documented exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        ctx.call_on_close(close_runners)  # SSH connections of remote hosts and targets
        try:
            return super().invoke(ctx)
        except GfsError as exc:
            for line in str(exc).splitlines():
                click.echo(f"gfs: error: {line}", err=True)
            ctx.exit(int(exc.exit_code))
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            sys.stderr.close()
            ctx.exit(int(ExitCode.OK))
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(
                f"gfs: internal error: {type(exc).__name__}: {exc} "
                "(run again with --debug for a traceback)",
                err=True,
            )
            ctx.exit(int(ExitCode.INTERNAL))


@click.group(
    cls=GfsGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.version_option(__version__, prog_name="gfs")
def cli(debug: bool) -> None:
    """gfs-backup: turn snapshots into real, verified grandfather-father-son backups.

    Start with `gfs plan --help`: it previews what a retention policy keeps and prunes,
    for configured jobs or for any list of timestamps, without touching anything.
    """
    setup_logging(debug)


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="gfs")


for command in (
    plan.plan_command,
    check.check_command,
    jobs.run_command,
    jobs.notify_failure_command,
    jobs.export_command,
    jobs.snapshot_command,
    jobs.prune_command,
    inspect.list_command,
    inspect.status_command,
    inspect.metrics_command,
    data.verify_command,
    data.restore_command,
    drill.drill_command,
    data.protect_command,
    data.unprotect_command,
    data.forget_command,
    hosts.hosts_group,
    init.init_command,
):
    cli.add_command(command)
