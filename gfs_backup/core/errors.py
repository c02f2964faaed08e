"""Typed errors of the core and the exit codes the CLI maps them to.

The core raises these; only the CLI turns them into one-line messages and exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of every gfs command (README lists them)."""

    OK = 0
    INTERNAL = 1  # a bug: unexpected exception (traceback with --debug)
    USAGE = 2  # wrong command-line usage (click's own code)
    CONFIG = 3  # invalid configuration, policy or input file
    PARTIAL = 4  # some jobs failed, others succeeded
    FAILED = 5  # every job failed
    LOCKED = 6  # another gfs run holds the job's lock
    WARNINGS = 7  # `gfs check`: configuration valid, but warnings need attention


class GfsError(Exception):
    """Base of all expected errors; `exit_code` says how the CLI exits."""

    exit_code: ExitCode = ExitCode.FAILED


@dataclass(frozen=True)
class Problem:
    """One finding about an input: which file, which dotted key or line, what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class InputError(GfsError):
    """Invalid configuration, policy, timestamps file or option value.

    Carries every problem found, so the user can fix them all at once.
    """

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = problems
        super().__init__("\n".join(str(p) for p in problems))
