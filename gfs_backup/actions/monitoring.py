"""What a `gfs run` tells the world when it ends: the Prometheus textfile, the run's
notification, the run's dead-man ping. None of them can change the run's result: each
failure is one logged line."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from gfs_backup.actions.freshness import judge
from gfs_backup.actions.metrics import registry_of, write_textfile
from gfs_backup.actions.plan import select_jobs
from gfs_backup.actions.run import JobOutcome
from gfs_backup.actions.status import JobStatus, job_status
from gfs_backup.core.config import Config, Job
from gfs_backup.core.errors import ExitCode
from gfs_backup.core.state import State
from gfs_backup.ops.notify import notify
from gfs_backup.ops.pings import LogTail, Pinger
from gfs_backup.ops.report import FAILURE, JobReport, RunReport
from gfs_backup.ops.settings import ops_of

log = logging.getLogger("gfs")
LAST_RUN = "last-run.json"  # in state_dir: the last run's exit code, for `gfs metrics`
# A unit failing this soon after a run that recorded its failure: gfs reported it already.
REPORTED_WITHIN = timedelta(minutes=5)


class RunWatch:
    """Around one `gfs run`: the run's ping (start, then success or fail with the log's
    last lines), then the report, metrics and notification."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ops = ops_of(config)
        self.started = datetime.now(timezone.utc)
        self.tail = LogTail()
        self.tail.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self.pinger = Pinger(self.ops.ping_url, log) if self.ops.ping_url else None

    def __enter__(self) -> RunWatch:
        logging.getLogger("gfs").addHandler(self.tail)
        if self.pinger is not None:
            self.pinger.start()
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("gfs").removeHandler(self.tail)

    def finish(self, jobs: list[Job], outcomes: list[JobOutcome], exit_code: int) -> RunReport:
        kinds = {job.title: job.kind for job in jobs}
        report = RunReport(
            socket.gethostname(),
            self.started,
            datetime.now(timezone.utc),
            exit_code,
            tuple(
                JobReport(
                    outcome.job,
                    kinds.get(outcome.job, kinds.get(outcome.job.partition("/")[0], "")),
                    outcome.status,
                    outcome.generation,
                    outcome.bytes,
                    outcome.seconds,
                    outcome.message,
                    tuple(outcome.warnings),
                )
                for outcome in outcomes
            ),
        )
        steps: list[tuple[str, Callable[[], object]]] = [
            ("record", lambda: _record_last_run(self.config, report)),
            ("metrics", lambda: write_metrics(self.config, report.finished, report)),
        ]
        if self.ops.notify is not None:
            notify_settings = self.ops.notify
            steps.append(("notify", lambda: notify(notify_settings, report, log)))
        if self.pinger is not None:
            pinger = self.pinger
            if exit_code == 0:
                steps.append(("ping", lambda: pinger.success(_summary(report))))
            else:
                body = _summary(report) + "\n" + self.tail.text()
                steps.append(("ping", lambda: pinger.fail(body)))
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # reporting never changes the run's result
                log.warning("%s after the run failed: %s: %s", name, type(exc).__name__, exc)
        return report


def _summary(report: RunReport) -> str:
    lines = [f"gfs run on {report.host}: exit code {report.exit_code}"]
    lines += [
        f"{job.job}: {job.status}{': ' + job.message if job.message else ''}" for job in report.jobs
    ]
    return "\n".join(lines) + "\n"


def _record_last_run(config: Config, report: RunReport) -> None:
    path = config.state_dir / LAST_RUN
    data = {"exit_code": report.exit_code, "finished": report.finished.isoformat()}
    try:
        temporary = path.with_name(f".{LAST_RUN}.tmp")
        temporary.write_text(json.dumps(data) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot record the run's result in %s: %s", path, exc.strerror)


def last_run(config: Config) -> RunReport | None:
    """The exit code and end of the last `gfs run` (None if unknown)."""
    try:
        data = json.loads((config.state_dir / LAST_RUN).read_text(encoding="utf-8"))
        finished = datetime.fromisoformat(str(data["finished"]))
        return RunReport("", finished, finished, int(data["exit_code"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def statuses(config: Config, jobs: list[Job], now: datetime) -> list[JobStatus]:
    state = State.read_only(config.state_dir)
    try:
        return [job_status(config, job, state, now) for job in jobs]
    finally:
        if state is not None:
            state.close()


def write_metrics(
    config: Config, now: datetime, report: RunReport | None = None, path: Path | None = None
) -> Path | None:
    """Write every job's metrics to `path` (default: the configured textfile); the path
    written, or None (metrics off, or the default directory absent: no node_exporter).
    Never raises: a failure is logged."""
    ops = ops_of(config)
    explicit = path is not None or ops.textfile_explicit
    path = path or ops.textfile
    if path is None:
        return None
    if not path.parent.is_dir():
        if explicit:
            log.warning(
                "metrics: directory %s does not exist: create it (node_exporter's "
                "--collector.textfile.directory) or set [metrics] textfile",
                path.parent,
            )
        return None
    try:
        state = State.read_only(config.state_dir)
        try:
            # What the metrics read: listings and runs, not the health checks (no libvirt
            # connection or target check per job after every run).
            every = select_jobs(config, [])  # a pattern job: each domain's history
            found = [job_status(config, job, state, now, health=False) for job in every]
            judged = [judge(status, now) for status in found]
            registry = registry_of(found, judged, state, report or last_run(config))
        finally:
            if state is not None:
                state.close()
        write_textfile(path, registry)
    except (OSError, ValueError) as exc:
        log.warning("metrics: cannot write %s: %s", path, exc)
        return None
    return path


def unit_failed(config: Config, unit: str, journal_lines: int = 20) -> list[str]:
    """What `gfs-failure@.service` does when gfs-run.service failed (killed, timed out,
    crashed before it could notify): one failure notification and the run's /fail ping,
    with the unit's last journal lines. Returns the channels' problems (logged)."""
    now = datetime.now(timezone.utc)
    last = last_run(config)
    if last is not None and last.exit_code != 0 and now - last.finished < REPORTED_WITHIN:
        log.info(
            "%s failed after gfs reported the run's exit code %d itself: nothing more to send",
            unit,
            last.exit_code,
        )
        return []
    tail = _journal_tail(unit, journal_lines)
    report = RunReport(
        socket.gethostname(),
        now,
        now,
        int(ExitCode.FAILED),
        (
            JobReport(
                f"systemd unit {unit}",
                "systemd",
                "failed",
                message=f"the unit failed; its journal's last lines:\n{tail}",
            ),
        ),
    )
    ops = ops_of(config)
    settings = replace(ops.notify, on=(FAILURE,)) if ops.notify is not None else None
    problems = notify(settings, report, log) if settings is not None else []
    if ops.ping_url:
        Pinger(ops.ping_url, log).fail(f"systemd unit {unit} failed\n{tail}")
    return problems


def _journal_tail(unit: str, lines: int) -> str:
    argv = ["journalctl", "--unit", unit, "--lines", str(lines), "--no-pager", "--quiet"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(journalctl could not be run: {exc})"
    text = done.stdout.strip() or done.stderr.strip()
    return text or f"(journalctl shows nothing for {unit})"
