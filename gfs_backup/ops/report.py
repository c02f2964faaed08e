"""What one `gfs run` did, as the notifiers, pings and metrics see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

# Severity of a run, lowest first: what `[notify] on` selects.
SUCCESS = "success"
WARNING = "warning"
FAILURE = "failure"
SEVERITIES = (SUCCESS, WARNING, FAILURE)


@dataclass(frozen=True)
class JobReport:
    job: str
    kind: str
    status: str  # ok | failed | locked | not-due | dry-run
    generation: str | None = None
    bytes_written: int = 0
    seconds: float = 0.0
    message: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def severity(self) -> str:
        if self.status == "failed":
            return FAILURE
        if self.status == "locked" or self.warnings:
            return WARNING
        return SUCCESS


@dataclass(frozen=True)
class RunReport:
    host: str  # this machine's name (socket.gethostname())
    started: datetime  # aware, UTC
    finished: datetime
    exit_code: int  # gfs's exit code for the run (README: 0, 4, 5, 6)
    jobs: tuple[JobReport, ...] = field(default_factory=tuple)

    @property
    def severity(self) -> str:
        """The worst severity of its jobs (a run of no job is a success)."""
        found = {job.severity for job in self.jobs}
        for severity in (FAILURE, WARNING):
            if severity in found:
                return severity
        return SUCCESS

    @property
    def ran(self) -> tuple[JobReport, ...]:
        """The jobs that did something (not "not-due")."""
        return tuple(job for job in self.jobs if job.status != "not-due")
