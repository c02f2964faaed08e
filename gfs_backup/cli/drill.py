"""`gfs drill`: restore a generation into a scratch location and prove it works."""

from __future__ import annotations

import json
import shlex
import signal
from collections.abc import Callable
from pathlib import Path

import click

from gfs_backup.actions.drill import DrillResult, drill, result_json
from gfs_backup.actions.drillreport import junit_xml, summary_markdown, write_report
from gfs_backup.actions.plan import select_one
from gfs_backup.actions.run import now_utc
from gfs_backup.actions.targetdrill import DEFAULT_SCRATCH, TargetDrill, drill_target
from gfs_backup.cli.complete import complete_jobs
from gfs_backup.cli.data import generation_option
from gfs_backup.cli.jobs import Terminated, _on_sigterm, wait_option
from gfs_backup.cli.options import config_option, json_option
from gfs_backup.core.config import load_config
from gfs_backup.core.errors import ExitCode, GfsError
from gfs_backup.core.policy import DRILL_ACCEL, DRILL_SELECT


@click.command("drill")
@click.argument("jobs", nargs=-1, shell_complete=complete_jobs)
@click.option(
    "--target",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    help="Drill from this backup target alone (a CI runner): no config, state or libvirt.",
)
@click.option("--all-jobs", is_flag=True, help="With --target: every job found there.")
@click.option(
    "--select",
    type=click.Choice(DRILL_SELECT),
    default="newest",
    show_default=True,
    help="With --target: which generation of each job (by its rotation label).",
)
@click.option(
    "--scratch",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --target: the scratch directory (default $TMPDIR or /var/tmp).",
)
@click.option("--console", help="With --target: the console regex (default: the generation's).")
@click.option("--agent/--no-agent", default=None, help="With --target: require the guest agent.")
@click.option("--timeout", type=float, help="With --target: boot timeout in seconds.")
@click.option("--memory", type=int, help="With --target: memory cap in MiB.")
@click.option("--accel", type=click.Choice(DRILL_ACCEL), help="With --target: auto, tcg, kvm.")
@click.option(
    "--command",
    "commands",
    multiple=True,
    help="With --target: a command the guest's agent runs (split like a shell would, not "
    "run by one); repeatable; replaces the generation's.",
)
@click.option(
    "--port",
    "ports",
    type=click.IntRange(1, 65535),
    multiple=True,
    help="With --target: a guest TCP port that must accept; repeatable.",
)
@click.option(
    "--record",
    is_flag=True,
    help="With --target: write each result beside its generation's manifest (a file of its "
    "own: never racing the host's runs), where gfs status and metrics see it.",
)
@config_option
@generation_option
@wait_option
@json_option
@click.option(
    "--junit",
    "junit",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the result as JUnit XML (one testcase per check) for CI.",
)
@click.option(
    "--summary",
    "summary",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also append a Markdown table to this file (e.g. $GITHUB_STEP_SUMMARY).",
)
def drill_command(
    jobs: tuple[str, ...],
    target: Path | None,
    all_jobs: bool,
    select: str,
    scratch: Path | None,
    console: str | None,
    agent: bool | None,
    timeout: float | None,
    memory: int | None,
    accel: str | None,
    commands: tuple[str, ...],
    ports: tuple[int, ...],
    record: bool,
    config_path: Path,
    generation: str | None,
    wait: bool,
    as_json: bool,
    junit: Path | None,
    summary: Path | None,
) -> None:
    """Restore a generation of JOB into a scratch directory and prove it works.

    \b
    libvirt jobs: booted straight from the generation's images on the target, from the
      saved domain XML in a plain QEMU, never through libvirt: no network device, memory
      capped, one or two vCPUs, snapshot mode (each image is the read-only backing file
      of an overlay in the scratch directory: the start costs seconds whatever the disk
      size, the scratch holds what the guest writes), serial console to a file, direct
      kernel boot when the domain uses it. Checks, each reported on its own:
        checksums       every image read in full while it boots, against the manifest
        qemu-img check  qcow2 images (raw images have no structure to check)
        boot            within the policy's [drill] timeout its console regex appears
                        and/or (agent = true) qemu-guest-agent answers guest-sync and
                        guest-ping over a private socket (no console and no agent:
                        the regex `login:`)
      A damaged image fails the drill even when it boots. The original domain, its
      disks and its network are never touched.
    files jobs: the tree is restored and every file re-read and compared with the
      manifest's checksums.
    btrfs jobs: the stream is checksummed, received (btrfs receive checks each
      command's CRC) into scratch_dir, which must be on btrfs, its received UUID
      checked, and every file read back (btrfs checks data checksums on read).
    lvm jobs: the raw image is restored into the scratch directory (from a target on
      another host: streamed from that host), checked against the manifest, and the
      filesystem blkid finds in it checked read-only (e2fsck -f -n, btrfs check
      --readonly, xfs_repair -n -f, fsck.vfat -n); with a partition table (a VM disk),
      the filesystem of each partition. A volume or partition holding no filesystem
      (raw data, swap) passes on its checksum and the result says so.
    \b
    Scratch: the job's scratch_dir (default /var/tmp; btrfs: the directory holding the
    subvolume), in a `.gfs-drill-*` directory that is always removed, also on SIGTERM;
    QEMU is killed by its PID. The result (time, duration, outcome, check, reason and,
    on failure, the last 2 KiB of the console) is appended to the manifest's `drills`
    and to the run history (`gfs status` shows the last drill).
    \b
    Policy [drill] keys: schedule (drill after `gfs run` when due), select (newest, son,
    father, grandfather, yearly: which generation a scheduled drill picks), console
    (regex), agent (true/false), timeout (seconds or "5m", default 5 min), memory (MiB
    cap, default 1024), accel (tcg, the default, or kvm).
    \b
    --junit FILE and --summary FILE write the result for CI (docs/drills.md).
    \b
    From the target alone (a CI runner mounting the share, read-only is enough):
      gfs drill --target /mnt/backup --all-jobs --select grandfather \\
                --junit drill.xml --summary "$GITHUB_STEP_SUMMARY"
    no configuration, state or libvirt; VM checks come from each generation (the policy
    at export time) or the flags; nothing under the target is written (--record: the
    result as a file beside the manifest); files, btrfs and lvm generations need root.
    Exit 5 when any drill failed or could not run.
    Exit 0 passed, 5 the drill failed (or was interrupted), 3 invalid configuration,
    6 the job's lock is held.
    """
    if target is not None:
        request = TargetDrill(
            target,
            jobs,
            all_jobs,
            select,
            generation,
            scratch or DEFAULT_SCRATCH,
            console,
            agent,
            timeout,
            memory,
            accel,
            record,
            tuple(tuple(shlex.split(command)) for command in commands) if commands else None,
            ports or None,
        )
        _report(_interruptible(lambda: drill_target(request, now_utc())), as_json, junit, summary)
        return
    if len(jobs) != 1 or all_jobs:
        raise click.UsageError("name exactly one JOB (or drill from a target: --target PATH)")
    job = jobs[0]
    config = load_config(config_path)
    selected = select_one(config, job)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = drill(config, selected, generation, now_utc(), wait)
    except Terminated:
        raise GfsError(
            f"job {job}: drill interrupted by SIGTERM: QEMU was killed and the scratch "
            "directory removed; nothing was recorded"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if junit is not None:
        write_report(junit, junit_xml([result]))
    if summary is not None:
        write_report(summary, summary_markdown([result]).encode())
    if as_json:
        click.echo(json.dumps(result_json(result), indent=2))
    else:
        verdict = "passed" if result.passed else "FAILED"
        click.echo(
            f"{job} {result.generation}: drill {verdict} in {result.seconds:.1f} s "
            f"({result.check}): {result.reason}"
        )
        if not result.passed and result.console_tail:
            click.echo("console ends:")
            for line in result.console_tail.splitlines()[-15:]:
                click.echo(f"  | {line}")
    if not result.passed:
        raise SystemExit(int(ExitCode.FAILED))


def _interruptible(work: Callable[[], list[DrillResult]]) -> list[DrillResult]:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return work()
    except Terminated:
        raise GfsError(
            "drill interrupted by SIGTERM: QEMU was killed and the scratch directory removed"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(
    results: list[DrillResult], as_json: bool, junit: Path | None, summary: Path | None
) -> None:
    """Print and write the results of a target drill; exit 5 unless every one passed."""
    if junit is not None:
        write_report(junit, junit_xml(results))
    if summary is not None:
        write_report(summary, summary_markdown(results).encode(), append=True)
    if as_json:
        click.echo(json.dumps({"drills": [result_json(r) for r in results]}, indent=2))
    else:
        for result in results:
            verdict = "ERROR" if result.error else "passed" if result.passed else "FAILED"
            click.echo(
                f"{result.job} {result.generation}: drill {verdict} in "
                f"{result.seconds:.1f} s: {result.reason}"
            )
            for check in result.checks:
                click.echo(
                    f"  {'ok    ' if check.passed else 'FAILED'} {check.name} "
                    f"({check.seconds:.1f} s): {check.detail}"
                )
    if not results or not all(result.passed for result in results):
        raise SystemExit(int(ExitCode.FAILED))
